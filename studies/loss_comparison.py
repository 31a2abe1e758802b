"""Loss comparison (paper Table 1): zero-shot, CE, BalCE, Focal, LDAM, MMS, LFM + CE, LFM + MMS.

Each method is a named bundle of settings; the grid runs over the method names. Each loss
runs at its own default logit scale (see README) unless a preset or `--logit-scale S` sets
one (fashion-lt's preset does: every loss there runs at its s). Zero-shot needs an image tower
aligned with its text tower (a CLIP model's own, model.text clip); elsewhere (fashion-lt's
GloVe features) its row drops out.
    python studies/loss_comparison.py
    python studies/loss_comparison.py --logit-scale 30 --name loss_comparison_s30
"""

import sys

from lfm_ray.commands.study_flags import ScriptPlan, run_script

# method name -> (loss, mixing, zero-shot)
METHODS = {
    "zero-shot": ("ce", "none", True),
    "CE": ("ce", "none", False),
    "BalCE": ("balce", "none", False),
    "Focal": ("focal", "none", False),
    "LDAM": ("ldam", "none", False),
    "MMS": ("mms", "none", False),
    "LFM + CE": ("ce", "lfm", False),
    "LFM + MMS": ("mms", "lfm", False),
}


def rows_for(args) -> list[str]:
    """The rows the study's model can run: zero-shot only with CLIP's own text tower."""
    from lfm_ray.commands.run_flags import config_layers, flag_values
    from lfm_ray.text import CLIP, resolve_text

    flags = flag_values(args, several_datasets=True)
    flags.pop("data.name", None)  # each data set is resolved below, with its own preset
    layers = config_layers(args, flags=flags)
    names = list(METHODS)
    if any(resolve_text(layers.resolve(d).model) != CLIP for d in args.datasets):
        names.remove("zero-shot")
    return names


def declare(args) -> ScriptPlan:
    names = ["CE", "LFM + CE"] if args.smoke else rows_for(args)
    return ScriptPlan(grid={"method": names}, seeds=[0],
                      variants={n: {"loss.name": METHODS[n][0], "mix.method": METHODS[n][1],
                                    "runtime.zero_shot": METHODS[n][2]} for n in names})


def main(argv=None) -> int:
    return run_script(declare, __file__, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
