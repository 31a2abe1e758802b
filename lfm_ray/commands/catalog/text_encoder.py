"""LFM with a pretrained text encoder on a vision-only backbone, against the same backbone
without one (the paper's stated future work: LFM beyond CLIP).

The same timm image tower (on fashion-lt its preset's) in two heads: with the frozen class
features of a pretrained text encoder (`model.text`, GloVe word vectors on fashion-lt: the
cosine classifier through a bridge and W_I, LFM's S from the same features), and without
one (`model.text none`: a linear head at logit scale 1, retrained in stage 2, LFM's S from
the image prototypes of the untrained tower). Each head trains CE alone and LFM + CE; one
more row gives the linear head LFM's partners from the text encoder alone (`text:glove`
similarity), which separates what the partners bring from what the classifier brings.
    python studies/text_encoder.py
    python studies/text_encoder.py --model timm:resnet50 --pretrained a1_in1k --dataset cifar100-lt \
        --data-root /data --model.image_size 224 --gpus-per-worker 0.25
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/text_encoder.py"  # the script that runs it from a checkout

TEXT = "glove"  # the pretrained text encoder compared (lfm_ray/text.py)
LINEAR = {"model.text": "none", "model.logit_scale": None}

# method name -> the settings of its row
METHODS = {
    "CE, text classifier": {"model.text": TEXT, "mix.method": "none"},
    "LFM, text classifier": {"model.text": TEXT, "mix.method": "lfm", "mix.similarity": "text"},
    "CE, linear head": {**LINEAR, "mix.method": "none"},
    "LFM, linear head, image prototypes": {**LINEAR, "mix.method": "lfm",
                                           "mix.similarity": "image-prototypes"},
    "LFM, linear head, text partners": {**LINEAR, "mix.method": "lfm",
                                        "mix.similarity": f"text:{TEXT}"},
}
SMOKE = ["LFM, text classifier", "LFM, linear head, image prototypes"]


def declare(args) -> ScriptPlan:
    from lfm_ray.families import model_family
    from lfm_ray.commands.run_flags import config_layers
    from lfm_ray.errors import LfmError

    for dataset in args.datasets:
        model = config_layers(args).resolve(dataset).model.name
        if model_family(model) != "timm":
            raise LfmError(f"the text-encoder study compares heads on a vision-only backbone; "
                           f"{model} is a CLIP model (give --model timm:ARCH)")
    names = SMOKE if args.smoke else list(METHODS)
    return ScriptPlan(fixed={"loss.name": "ce"}, grid={"method": names}, seeds=[0, 1],
                      variants={n: METHODS[n] for n in names})


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
