"""α ablation (paper Fig. 9): LFM with τ = 0.05 for α from 0 to 2.

The paper's protocol (`--protocol branch`, the default on its data sets and on the embedded
fashion-lt, with three seeds): stage 1 is trained once per seed with α = 1 and each α is
swept in stage 2 from that checkpoint, as the authors' ablation configs do. `--protocol full`
(the default elsewhere, e.g. digits-lt) retrains both stages with each α. On CIFAR-100-LT
the paper's preset applies, with the paper's RN50 backbone for this figure.
    python studies/alpha_sweep.py
    python studies/alpha_sweep.py --dataset cifar100-lt --data-root /data --seeds 0,1,2
"""

from lfm_ray.commands.study_flags import ScriptPlan, paper_protocol, run_script

SCRIPT = "studies/alpha_sweep.py"  # the script that runs it from a checkout

ALPHAS = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]
STAGE1_ALPHA = 1.0  # the stage-1 model the ablation branches from: LFM with α = 1


def declare(args) -> ScriptPlan:
    alphas = [0.0, 1.0] if args.smoke else ALPHAS
    fixed = {"mix.method": "lfm", "mix.tau": 0.05}
    if paper_protocol(args) == "branch":
        return ScriptPlan(fixed={**fixed, "mix.alpha": STAGE1_ALPHA},
                          grid={"stage2.alpha": alphas}, seeds=[0, 1, 2], share_stage1=True,
                          protocol="branch")
    return ScriptPlan(fixed=fixed, grid={"mix.alpha": alphas}, seeds=[0, 1], protocol="full")


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
