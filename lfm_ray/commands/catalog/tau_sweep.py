"""τ ablation (paper Fig. 10): LFM with α = 1 for τ ∈ {0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25}.

The paper's protocol (`--protocol branch`, the default on its data sets and on the embedded
fashion-lt, with three seeds): stage 1 is trained once per seed with τ = 0.05 and each τ is
swept in stage 2 from that checkpoint, as the authors' ablation configs do. `--protocol full`
(the default elsewhere, e.g. digits-lt) retrains both stages with each τ. On CIFAR-100-LT
the paper's preset applies, with the paper's ViT-B/16 backbone for this figure.
    python studies/tau_sweep.py
    python studies/tau_sweep.py --address auto --dataset cifar100-lt --data-root /data \
        --pretrained openai --gpus-per-worker 0.25
"""

from lfm_ray.commands.study_flags import ScriptPlan, paper_protocol, run_script

SCRIPT = "studies/tau_sweep.py"  # the script that runs it from a checkout

TAUS = [0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25]  # the authors' grid
STAGE1_TAU = 0.05  # the authors' stage-1 model for the ablation (config/ablation/tau.yaml)


def declare(args) -> ScriptPlan:
    taus = TAUS[:2] if args.smoke else TAUS
    fixed = {"mix.method": "lfm", "mix.alpha": 1.0}
    if paper_protocol(args) == "branch":
        return ScriptPlan(fixed={**fixed, "mix.tau": STAGE1_TAU}, grid={"stage2.tau": taus},
                          seeds=[0, 1, 2], share_stage1=True, protocol="branch")
    return ScriptPlan(fixed=fixed, grid={"mix.tau": taus}, seeds=[0, 1], protocol="full")


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
