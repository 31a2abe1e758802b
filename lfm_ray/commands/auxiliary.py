"""`lfm-ray aux`: curate auxiliary classes for category extrapolation, offline.

    lfm-ray aux --candidates names.txt --output aux/                  # propose neighbours
    lfm-ray aux --candidates names.txt --images crawled/ --output aux/  # and clean the images
    lfm-ray train --loss balce --aux-root aux --aux-neighbours aux/neighbours.json

Given the target classes (--dataset, --data-root) and candidate class names (a text file,
one name a line, e.g. ImageNet-21k's class names), it proposes each target class's
neighbours by text similarity (the run's text encoder: --model.text, CLIP's own tower with
--model, --pretrained and --template, or GloVe word vectors): k for the largest class, more
for smaller ones, k_t = min(max_k, ceil(k · n_max / n_t)). Given a folder of candidate
images (crawled/<candidate>/*), it keeps the images whose feature (the run's image tower, as
loaded) has a cosine to their class prototype in [--min-cos, --max-cos] (the paper: 0.7 and
0.98) and writes them to OUTPUT/<class>/. The neighbour map goes to OUTPUT/neighbours.json; without
--images it lists the proposed classes, whose images are then to be collected.
(This module is not called aux.py: AUX is a reserved file name on Windows.)
"""

from __future__ import annotations

import argparse

from lfm_ray.commands.run_flags import HelpFormatter, add_run_flags, config_layers


def register(sub: argparse._SubParsersAction) -> None:
    from lfm_ray.config import AUX_CURATION as DEFAULT

    p = sub.add_parser("aux", help="curate auxiliary classes: neighbours by text similarity, "
                                   "images by their class prototype",
                       description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--candidates", required=True, metavar="FILE",
                   help="text file of candidate class names, one a line (# comments)")
    p.add_argument("--images", metavar="DIR",
                   help="candidate images, DIR/<candidate class>/*: the kept ones are copied "
                        "to OUTPUT/<class>/")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="a new folder: the auxiliary classes and neighbours.json")
    p.add_argument("--k", type=int, default=DEFAULT["k"],
                   help="neighbours of the largest target class (default %(default)s)")
    p.add_argument("--max-k", type=int, default=DEFAULT["max_k"],
                   help="most neighbours of any target class (default %(default)s)")
    p.add_argument("--min-cos", type=float, default=DEFAULT["min_cos"],
                   help="keep images with cosine to their class prototype >= this "
                        "(default %(default)s)")
    p.add_argument("--max-cos", type=float, default=DEFAULT["max_cos"],
                   help="... and <= this: above it, near-copies (default %(default)s)")
    add_run_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfm_ray.curation import curate, summary

    cfg = config_layers(args).resolve().validate()
    result = curate(cfg, args.candidates, args.output, images_root=args.images, k=args.k,
                    max_k=args.max_k, min_cos=args.min_cos, max_cos=args.max_cos)
    print(summary(result))
    return 0
