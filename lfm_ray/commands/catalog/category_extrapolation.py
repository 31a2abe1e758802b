"""Category extrapolation ("Learning from Neighbors", Zhao et al., CVPR 2025), as its ablation:
baseline BalCE, + random extra classes, + auxiliary neighbour classes without silencing,
+ neighbour silencing, and the same with LFM, on many / medium / few / all.

Every method trains with BalCE; the auxiliary classes are masked out at inference, so every
figure is over the target classes. By default the study runs on the embedded fashion-lt with
its embedded auxiliary sets: fashion-aux (each class's images turned a quarter turn, "rotated
Sneaker", the class's neighbour) and, for the random-extra-data row, fashion-aux-scrambled
(as many pixel-scrambled images, no class's neighbour); digits-lt has digits-aux and
digits-aux-scrambled. They stand in for the LLM-chosen, web-crawled classes of the paper. On your own data give the auxiliary folder and neighbour map (the random row then
drops out: it needs a second, unrelated auxiliary set, e.g. a study run with --aux-root of
one and --name of its own):
    python studies/category_extrapolation.py
    python studies/category_extrapolation.py --dataset imagenet-lt --data-root /data/imagenet \
        --pretrained openai --aux-root /data/aux --aux-neighbours /data/aux/neighbours.json
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/category_extrapolation.py"  # the script that runs it from a checkout

# data set -> (its embedded neighbour set, its embedded unrelated set: random extra data)
EMBEDDED = {"fashion-lt": ("fashion-aux", "fashion-aux-scrambled"),
            "digits-lt": ("digits-aux", "digits-aux-scrambled")}

# method name -> (mixing, auxiliary set: None, "random" or "neighbours", silence)
METHODS = {
    "BalCE": ("none", None, "none"),
    "BalCE + random aux": ("none", "random", "none"),
    "BalCE + aux": ("none", "neighbours", "none"),
    "BalCE + aux + NS": ("none", "neighbours", "neighbours"),
    "LFM + BalCE": ("lfm", None, "none"),
    "LFM + BalCE + aux + NS": ("lfm", "neighbours", "neighbours"),
}
SMOKE = ["BalCE", "BalCE + aux + NS", "LFM + BalCE + aux + NS"]


def declare(args) -> ScriptPlan:
    from lfm_ray.commands.run_flags import config_layers
    from lfm_ray.errors import LfmError

    given = config_layers(args).resolve().aux.root   # --aux-root or the config file's
    datasets = list(args.datasets)
    if given is None and (len(datasets) != 1 or datasets[0] not in EMBEDDED):
        raise LfmError(f"category extrapolation on {', '.join(datasets)} needs the auxiliary "
                       "classes: --aux-root FOLDER --aux-neighbours MAP.json (the embedded "
                       f"auxiliary sets are for {' and '.join(EMBEDDED)}, one at a time)")
    neighbours, random = EMBEDDED.get(datasets[0], (None, None))
    root = given or neighbours
    names = SMOKE if args.smoke else list(METHODS)
    if root != neighbours:  # a set of the user's: no unrelated set to compare with
        names = [n for n in names if METHODS[n][1] != "random"]
    variants = {}
    for name in names:
        mix, aux, silence = METHODS[name]
        variants[name] = {"loss.name": "balce", "mix.method": mix, "aux.silence": silence,
                          "aux.root": {None: None, "random": random, "neighbours": root}[aux]}
        if aux != "neighbours":  # the random set carries its own map; none without a set
            variants[name]["aux.neighbours"] = None
    # The neighbour set is the base (so it is checked and cached before any trial starts);
    # each method sets its own.
    return ScriptPlan(fixed={"loss.name": "balce", "aux.root": root},
                      grid={"method": names}, variants=variants, seeds=[0, 1])


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
