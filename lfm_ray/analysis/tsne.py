"""3-D t-SNE of the image features of chosen classes from trained checkpoints (paper
Fig. 3: zero-shot vs CE vs CE + LFM), coloured by class with sample counts in the legend.

A checkpoint is a directory holding state.pt with "visual" and "proj" state dicts and the
run's "config" (a RunConfig dict), as the trainer writes it. The classifier is rebuilt from
that config as the trainer builds it (`build_clip`, the text features, `LFMClassifier`), and
the images are the evaluation split of the same data set read through the node cache the
trainer uses (`load_arrays`), so they are decoded and resized exactly as in training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lfm_ray.errors import LfmError
from lfm_ray.safe_load import load_state_file

# Exact t-SNE is faster than Barnes-Hut for the few hundred points of a figure (3-D
# Barnes-Hut is slow); above this many points Barnes-Hut's n log n wins.
EXACT_TSNE_MAX_POINTS = 1500


def _checkpoint_dir(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint)
    if not path.is_dir() or not (path / "state.pt").is_file():
        raise LfmError(f"{str(path)!r} is not a checkpoint directory: it holds no state.pt "
                       "(expected e.g. a study's runs/ray/<study>/tune/<trial>/checkpoint_000025 "
                       "or a run's <output>/run.checkpoints/epoch_0025)")
    return path


def resolve_classes(classes: Sequence[int | str], class_names: Sequence[str]) -> list[int]:
    """Class indices from indices or class names; one clear error for anything else."""
    out = []
    names = [str(n) for n in class_names]
    for c in classes:
        text = str(c).strip()
        if text.lstrip("-").isdigit():
            k = int(text)
            if not 0 <= k < len(names):
                raise LfmError(f"class {k} is out of range; this data set has classes "
                               f"0..{len(names) - 1}")
        elif text in names:
            k = names.index(text)
        else:
            raise LfmError(f"class {text!r} is neither an index nor a class name; "
                           f"known: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        if k in out:
            raise LfmError(f"class {text!r} is given twice (it is class {k}, "
                           f"{names[k]!r}); give each class once")
        out.append(k)
    if len(out) < 2:
        raise LfmError("t-SNE needs at least two distinct classes, e.g. --classes 0,3,9")
    return out


ZERO_SHOT = "zero-shot"  # in a list of checkpoints: the pretrained model, W_I = identity


def load_checkpoint_state(checkpoint: str | os.PathLike) -> dict:
    """state.pt of a trainer checkpoint, checked for what the features need."""
    path = _checkpoint_dir(checkpoint)
    state = load_state_file(path / "state.pt")
    missing = [k for k in ("visual", "proj", "config") if k not in state]
    if missing:
        raise LfmError(f"{str(path / 'state.pt')!r} lacks {', '.join(missing)}; expected a "
                       "checkpoint written by the lfm-ray trainer")
    return state


def checkpoint_features(checkpoint: str | os.PathLike, classes: Sequence[int | str],
                        per_class: int = 200, split: str | None = None,
                        device: str = "cpu") -> dict:
    """Features of up to `per_class` evaluation images of each class: the L2-normalised
    W_I F_I(x) the classifier compares with the text features. Returns a dict with
    features (N, d), labels (N,), classes (indices), class_names, class_counts (training
    images per class) and config (the run's RunConfig)."""
    from lfm_ray.config import RunConfig

    if per_class < 1:
        raise LfmError(f"per_class={per_class} is not valid; expected at least 1 image")
    state = load_checkpoint_state(checkpoint)
    return features_of(RunConfig.from_dict(state["config"]), state, classes, per_class,
                       split, device)


@torch.no_grad()
def features_of(cfg, state: dict | None, classes: Sequence[int | str], per_class: int = 200,
                split: str | None = None, device: str = "cpu") -> dict:
    """As `checkpoint_features` for a RunConfig and a checkpoint state; with no state, the
    model as built (pretrained F_I, W_I = identity): the zero-shot features."""
    from lfm_ray.augment import BatchBuilder, DeviceImages
    from lfm_ray.backbones import build_backbone, build_classifier_for
    from lfm_ray.text import has_text
    from lfm_ray.data import load_arrays, run_options
    from lfm_ray.finetune import prepare
    from lfm_ray.model import seeded_build

    dev = torch.device(device)
    # As in training: the model first, since its input size is the size lazily decoded
    # data sets are cached at; then the class names for the text features.
    # Seeded as the trainer seeds, so a randomly initialised backbone (the tiny test model) is
    # the same one here: its zero-shot features are the trial's. Open_clip, or a timm: model.
    backbone, spec = seeded_build(cfg.runtime.seed, lambda: build_backbone(cfg.model, dev))
    data = cfg.data
    arrays = load_arrays(data.name, root=data.root, image=spec,
                         cache_dir=data.cache_dir,
                         **run_options(data))
    picked_classes = resolve_classes(classes, arrays.class_names)
    model, _ = build_classifier_for(backbone, cfg, arrays.class_names, dev, spec.size)
    del backbone
    if state is not None:
        # The tower as the run trained it: with its fine-tuning mode's modules.
        prepare(model, cfg.stage1, len(arrays.class_names), cfg.model.name)
        try:
            model.load_weights(state)
        except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
            from lfm_ray.weights import load_failure_reason

            raise LfmError(f"the checkpoint's weights do not fit the model its config names "
                           f"({cfg.model.name}): {load_failure_reason(exc)}") from None
    model.to(dev)
    model.eval()
    split = split or "test"  # the reported split
    images, labels = arrays.split(split)
    labels = np.asarray(labels)
    picked = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in picked_classes])
    if len(picked) == 0:
        raise LfmError(f"the {split} split has no image of classes "
                       f"{picked_classes}")
    build, store = BatchBuilder(spec, dev), DeviceImages(images, dev)
    out = []
    for start in range(0, len(picked), 256):
        pos = torch.as_tensor(picked[start:start + 256])
        z = model.encode(build(store.gather(pos))).float()
        if has_text(cfg.model):
            z = model.proj(z)  # W_I F_I(x); a linear head's features are the pooled features
        out.append(torch.nn.functional.normalize(z, dim=-1).cpu())
    return {"features": torch.cat(out).numpy(), "labels": labels[picked],
            "classes": picked_classes, "class_names": list(arrays.class_names),
            "class_counts": [int(c) for c in arrays.class_counts],
            "config": cfg}


def tsne_embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 3) t-SNE embedding; perplexity kept below the number of points."""
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 4:
        raise LfmError(f"t-SNE needs at least 4 images, got {n}; raise --per-class")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    method = "exact" if n <= EXACT_TSNE_MAX_POINTS else "barnes_hut"
    return TSNE(n_components=3, perplexity=perplexity, init="pca", random_state=seed,
                method=method).fit_transform(np.asarray(features, dtype=np.float64))


def tsne_figure(panels: Sequence[dict], title: str = "t-SNE of image features"):
    """One 3-D scatter per checkpoint (side by side), one colour per class across panels;
    the legend gives each class's training count and the number of images shown."""
    import plotly.colors as pc
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(panels), specs=[[{"type": "scene"}] * len(panels)],
                        subplot_titles=[p["title"] for p in panels], horizontal_spacing=0.01)
    palette = pc.qualitative.Plotly + pc.qualitative.D3
    for col, panel in enumerate(panels, start=1):
        xyz, labels = panel["xyz"], np.asarray(panel["labels"])
        for k, c in enumerate(panel["classes"]):
            m = labels == c
            name = (f"{panel['class_names'][c]} (n={panel['class_counts'][c]} training, "
                    f"{int(m.sum())} shown)")
            fig.add_trace(go.Scatter3d(
                x=xyz[m, 0], y=xyz[m, 1], z=xyz[m, 2], mode="markers", name=name,
                legendgroup=str(c), showlegend=col == 1,
                marker={"size": 3, "color": palette[k % len(palette)], "opacity": 0.85}),
                row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", height=650,
                      legend_title="class (training images, images shown)")
    return fig


def write_tsne(checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
               classes: Sequence[int | str], out: str | os.PathLike | None = None,
               per_class: int = 200, split: str | None = None, device: str = "cpu") -> Path:
    """A self-contained HTML file (plotly.js embedded) with one t-SNE panel per checkpoint.
    The entry "zero-shot" stands for the pretrained model of the first real checkpoint's
    config before any training (W_I = identity), the paper's left panel."""
    from lfm_ray.config import RunConfig

    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    entries = [str(c) for c in checkpoints]
    real = [Path(c) for c in entries if c != ZERO_SHOT]
    if not real:
        raise LfmError("give at least one checkpoint directory (holding state.pt); "
                       f"{ZERO_SHOT!r} uses the model and data set of the first one")
    if per_class < 1:
        raise LfmError(f"per_class={per_class} is not valid; expected at least 1 image")
    states = {str(p): load_checkpoint_state(p) for p in real}
    first_cfg = RunConfig.from_dict(states[str(real[0])]["config"])
    panels = []
    for entry in entries:
        if entry == ZERO_SHOT:
            cfg, state, title = first_cfg, None, "zero-shot (pretrained, W_I = I)"
        else:
            state = states[str(Path(entry))]
            cfg = RunConfig.from_dict(state["config"])
            path = Path(entry)
            title = f"{path.parent.name}/{path.name} ({_method(cfg)})"
        if (cfg.data.name, cfg.data.imbalance_factor) != \
                (first_cfg.data.name, first_cfg.data.imbalance_factor):
            raise LfmError(f"checkpoint {entry!r} was trained on {cfg.data.name} and "
                           f"{str(real[0])!r} on {first_cfg.data.name}; compare checkpoints "
                           "of one data set")
        got = features_of(cfg, state, classes, per_class, split, device)
        panels.append({**got, "xyz": tsne_embed(got["features"]), "title": title})
    names = ", ".join(panels[0]["class_names"][c] for c in panels[0]["classes"])
    fig = tsne_figure(panels, title=f"t-SNE of image features W_I F_I(x): {names}")
    target = Path(out) if out else real[0].parent / f"tsne_{real[0].name}.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(target), include_plotlyjs=True, full_html=True)
    return target


def _method(cfg) -> str:
    return cfg.loss.name if cfg.mix.method == "none" else f"{cfg.loss.name} + {cfg.mix.method}"
