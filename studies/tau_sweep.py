"""τ ablation (paper Fig. 10): LFM with α = 1 for τ ∈ {0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25}.

Defaults: digits-lt, the tiny model, a local Ray instance, seeds 0 and 1. On CIFAR-100-LT
the paper's preset applies, with the paper's ViT-B/16 backbone for this figure.
    python studies/tau_sweep.py
    python studies/tau_sweep.py --address auto --dataset cifar100-lt --data-root /data \
        --pretrained openai --gpus-per-worker 0.25
"""

import sys

from lfm_ray.commands.study_flags import ScriptPlan, run_script

TAUS = [0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25]  # the authors' grid


def declare(args) -> ScriptPlan:
    return ScriptPlan(fixed={"mix.method": "lfm", "mix.alpha": 1.0},
                      grid={"mix.tau": TAUS[:2] if args.smoke else TAUS}, seeds=[0, 1])


def main(argv=None) -> int:
    return run_script(declare, __file__, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
