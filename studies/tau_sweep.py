"""τ ablation (paper Fig. 10): LFM with α = 1 for τ ∈ {0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25}
(the LFM authors' grid, config/ablation/tau-experiments.yaml).

Defaults: digits-lt, the tiny model, a local Ray instance, seeds 0 and 1.
    python studies/tau_sweep.py
    python studies/tau_sweep.py --address auto --dataset cifar100-lt --data-root /data \
        --model ViT-B-32 --pretrained openai --gpus-per-trial 0.25
"""

import sys

from lfm_ray.commands.study_flags import parse_seeds, run_script
from lfm_ray.config import RunConfig
from lfm_ray.study import Study

TAUS = [0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25]


def build(args, overrides) -> Study:
    base = RunConfig().override({"mix.method": "lfm", "mix.alpha": 1.0, **overrides})
    return Study(name=args.name, base=base,
                 grid={"mix.tau": TAUS[:2] if args.smoke else TAUS},
                 seeds=parse_seeds(args.seeds, [0, 1]))


def main(argv=None) -> int:
    return run_script(build, "tau_sweep", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
