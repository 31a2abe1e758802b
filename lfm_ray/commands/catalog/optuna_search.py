"""Joint Optuna search over α, τ, both learning rates and the loss, across data sets.

A seeded TPE sampler; loss-specific parameters (Focal's γ, MMS's margin) exist only in trials
of their loss. `--dataset` may repeat: the data set becomes a searched choice, each with its
own paper preset. Twelve sampled configurations, each trained on seeds 0, 1 and 2, Optuna
told each one's mean over them (36 trials, about ten minutes on 2 cores for fashion-lt;
`--smoke`: four configurations on one seed); the sampler's seed is the first seed.
`--seeds 0` samples on one seed; `--objectives acc_many,acc_few` makes it a multi-objective
search whose best.json is the Pareto set and whose report draws the trade-off front.
    python studies/optuna_search.py
    python studies/optuna_search.py --seeds 0
    python studies/optuna_search.py --objectives acc_many,acc_few
    python studies/optuna_search.py --dataset cifar10-lt --dataset cifar100-lt --data-root /data
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/optuna_search.py"  # the script that runs it from a checkout


def declare(args) -> ScriptPlan:
    from lfm_ray.study import Dim

    space = {
        "stage1.alpha": Dim.uniform(0.0, 2.0),
        "stage1.tau": Dim.loguniform(0.002, 31.25),
        "stage1.lr": Dim.loguniform(1e-4, 1e-2),
        "stage2.lr": Dim.loguniform(1e-3, 1e-1),
        "loss.name": Dim.choice(["ce", "balce", "focal", "mms"]),
        "loss.focal_gamma": Dim.uniform(0.5, 4.0, when={"loss.name": "focal"}),
        "loss.mms_margin": Dim.uniform(0.1, 0.5, when={"loss.name": "mms"}),
    }
    return ScriptPlan(fixed={"mix.method": "lfm"}, search="optuna", space=space,
                      num_samples=4 if args.smoke else 12,
                      seeds=[0] if args.smoke else [0, 1, 2])


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
