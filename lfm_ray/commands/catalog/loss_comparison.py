"""Loss comparison (paper Table 1, with the long-tail baselines of LIFT and cRT): zero-shot, CE,
BalCE, Focal, LDAM, MMS, CB, GRW, LADE, CE with post-hoc logit adjustment, CE with a
class-balanced stage 2 (cRT-style), CE with square-root sampling, LFM + CE, LFM + MMS.

Each method is a named bundle of settings; the grid runs over the method names. Each loss
runs at its own default logit scale (see README) unless a preset or `--logit-scale S` sets
one (fashion-lt's preset does: every loss there runs at its s). Zero-shot needs an image tower
aligned with its text tower (a CLIP model's own, model.text clip); elsewhere (fashion-lt's
GloVe features) its row drops out. "CE + post-hoc LA" is the CE model evaluated on
z − τ·log prior with Menon et al.'s τ = 1; "CE + cRT" draws stage 2's images class-balanced,
"CE + square-root sampling" both stages' with class probabilities ∝ √n_k.
    python studies/loss_comparison.py
    python studies/loss_comparison.py --logit-scale 30 --name loss_comparison_s30
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/loss_comparison.py"  # the script that runs it from a checkout


def _method(loss: str, mix: str = "none", **more) -> dict:
    return {"loss.name": loss, "mix.method": mix, "runtime.zero_shot": False, **more}


# method name -> its settings
METHODS = {
    "zero-shot": _method("ce", **{"runtime.zero_shot": True}),
    "CE": _method("ce"),
    "BalCE": _method("balce"),
    "Focal": _method("focal"),
    "LDAM": _method("ldam"),
    "MMS": _method("mms"),
    "CB": _method("cb"),
    "GRW": _method("grw"),
    "LADE": _method("lade"),
    "CE + post-hoc LA": _method("ce", **{"eval.logit_adjust_tau": 1.0}),
    "CE + cRT": _method("ce", **{"stage2.sampler": "class-balanced"}),
    "CE + square-root sampling": _method("ce", **{"stage1.sampler": "square-root",
                                                  "stage2.sampler": "square-root"}),
    "LFM + CE": _method("ce", "lfm"),
    "LFM + MMS": _method("mms", "lfm"),
}
SMOKE = ["CE", "LADE", "CE + post-hoc LA", "CE + cRT", "LFM + CE"]


def rows_for(args) -> list[str]:
    """The rows the study's model can run: zero-shot only with CLIP's own text tower."""
    from lfm_ray.commands.run_flags import config_layers, flag_values
    from lfm_ray.commands.study_flags import requested_datasets
    from lfm_ray.text import CLIP, resolve_text

    flags = flag_values(args, several_datasets=True)
    flags.pop("data.name", None)  # each data set is resolved below, with its own preset
    layers = config_layers(args, flags=flags)
    names = list(METHODS)
    datasets = getattr(args, "datasets", None) or requested_datasets(args)
    if any(resolve_text(layers.resolve(d).model) != CLIP for d in datasets):
        names.remove("zero-shot")
    return names


def declare(args) -> ScriptPlan:
    names = SMOKE if args.smoke else rows_for(args)
    return ScriptPlan(grid={"method": names}, seeds=[0],
                      variants={n: METHODS[n] for n in names})


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
