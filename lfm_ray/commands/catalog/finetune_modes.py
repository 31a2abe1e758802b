"""Fine-tuning modes (LIFT, ICML 2024): full fine-tuning of the image tower against the
lightweight modes (classifier, BitFit, LoRA, AdaptFormer, VPT, SSF), each without and with
LFM; the classifier mode also with its class weights started from the class means or a
linear probe of the frozen tower's features instead of the text features (LIFT's
initialisations).

"X" trains stage 1 in mode X with no mixing, "X + LFM" with LFM's mixing; both then train W_I
in stage 2, with CE. The lightweight modes train modules or weights that start from
scratch, from the identity or from the text features, so they take their own stage-1
learning rate (LIGHT_STAGE1 below, Adam); full fine-tuning takes the run's (a paper preset's
on its data set). trials.csv carries each trial's trained parameter counts, macro-F1,
harmonic-mean and worst-class accuracy beside many/medium/few/all.

The modes are about fine-tuning a pretrained CLIP ViT lightly; the embedded fashion-lt's
image tower is a small CNN trained from scratch (no pretrained image weights ship with
lfm-ray), which the ViT modes cannot adapt. So this study alone runs on digits-lt with the
tiny open_clip ViT by default, which shows the modes running, not LIFT's finding; give a
pretrained CLIP model and a data set for that.
    python studies/finetune_modes.py
    python studies/finetune_modes.py --dataset cifar100-lt --data-root /data \
        --pretrained openai --gpus-per-worker 0.5 --eval.tta fivecrop
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/finetune_modes.py"  # the script that runs it from a checkout

# method name prefix -> stage1.finetune
MODES = {"full": "full", "classifier": "classifier", "BitFit": "bitfit", "LoRA": "lora",
         "AdaptFormer": "adaptformer", "VPT": "vpt", "SSF": "ssf"}
# method name prefix -> model.classifier_init, for the classifier mode's other starts
CLASSIFIER_INITS = {"classifier (class mean)": "class-mean",
                    "classifier (linear probe)": "linear-probe"}
# Stage 1 of the lightweight modes: an Adam learning rate for newly trained modules (LIFT
# trains them with SGD at 0.01; Adam's steps are about lr in size whatever the gradient's).
LIGHT_STAGE1 = {"stage1.lr": 1e-3, "stage1.min_lr": 1e-6}
SMOKE = ["full", "full + LFM", "SSF", "classifier (linear probe) + LFM"]


def variants() -> dict[str, dict]:
    own: dict[str, dict] = {}
    for name, mode in MODES.items():
        own[name] = {"stage1.finetune": mode, **({} if mode == "full" else LIGHT_STAGE1)}
    for name, init in CLASSIFIER_INITS.items():
        own[name] = {**own["classifier"], "model.classifier_init": init}
    out = {}
    for name, settings in own.items():
        out[name] = {**settings, "mix.method": "none"}
        out[f"{name} + LFM"] = {**settings, "mix.method": "lfm"}
    return out


def declare(args) -> ScriptPlan:
    every = variants()
    names = SMOKE if args.smoke else list(every)
    # digits-lt and the tiny ViT unless a data set is asked for (see above).
    default = {} if _asked_for_data(args) else {"data.name": "digits-lt"}
    return ScriptPlan(fixed={**default, "loss.name": "ce"}, grid={"method": names}, seeds=[0],
                      variants={n: every[n] for n in names})


def _asked_for_data(args) -> bool:
    """Whether the flags or the config file name a data set."""
    from lfm_ray.commands.run_flags import config_layers

    layers = config_layers(args)
    return any("data.name" in layer for layer in (layers.file, layers.flags)) \
        or getattr(args, "preset", None) not in (None, "none")


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
