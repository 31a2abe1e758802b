"""Where LFM's class similarity comes from: LFM + CE with S from each source (mix.similarity).

The paper's S is the cosine of the class names' CLIP text features; it names where that fails
(biological names the text encoder does not know) and where it cannot apply (vision-only
backbones). Each row trains LFM + CE with P = softmax(S/τ) of another S: the run's own class
text features (`text`: on fashion-lt GloVe's, `model.text`; a CLIP model's own tower), the class means of the not yet trained image tower's
features (`image-prototypes`), the data set's class hierarchy where it has one (`taxonomy`,
iNaturalist 2018), and uniform partners (the ablation LFM must beat); CE without mixing is
the baseline. Other sources (text:MODEL[:PRETRAINED], taxonomy:FILE, file:PATH) run with
`lfm-ray study --grid mix.similarity=...`.
    python studies/similarity_sources.py
    python studies/similarity_sources.py --dataset inat2018 --data-root /data/inat2018 \
        --model ViT-B-16 --pretrained openai --gpus-per-worker 0.25
    python studies/similarity_sources.py --model timm:resnet50 --pretrained a1_in1k
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/similarity_sources.py"  # the script that runs it from a checkout

# method name -> the settings of its row
METHODS = {
    "CE": {"loss.name": "ce", "mix.method": "none"},
    "LFM text": {"loss.name": "ce", "mix.method": "lfm", "mix.similarity": "text"},
    "LFM image prototypes": {"loss.name": "ce", "mix.method": "lfm",
                             "mix.similarity": "image-prototypes"},
    "LFM taxonomy": {"loss.name": "ce", "mix.method": "lfm", "mix.similarity": "taxonomy"},
    "LFM uniform": {"loss.name": "ce", "mix.method": "lfm", "mix.similarity": "uniform"},
}


def rows_for(args) -> list[str]:
    """The rows the study's data sets and models can run: `text` needs the run's class text
    features (a CLIP model's own tower or a text encoder, model.text), `taxonomy` a data set
    with a class hierarchy of its own."""
    from lfm_ray.commands.run_flags import config_layers, flag_values
    from lfm_ray.similarity import has_taxonomy
    from lfm_ray.text import has_text

    flags = flag_values(args, several_datasets=True)
    flags.pop("data.name", None)  # each data set is resolved below, with its own preset
    layers = config_layers(args, flags=flags)
    names = list(METHODS)
    for dataset in args.datasets:
        cfg = layers.resolve(dataset)
        if not has_text(cfg.model) and "LFM text" in names:
            names.remove("LFM text")
        if not has_taxonomy(dataset) and "LFM taxonomy" in names:
            names.remove("LFM taxonomy")
    if args.smoke:
        names = [n for n in names if n in ("LFM image prototypes", "LFM uniform")]
    return names


def declare(args) -> ScriptPlan:
    names = rows_for(args)
    return ScriptPlan(grid={"method": names}, seeds=[0, 1],
                      variants={n: METHODS[n] for n in names})


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
