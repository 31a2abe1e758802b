"""3-D t-SNE of image features of chosen classes from a trained checkpoint (paper Fig. 3)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lfm_ray.errors import LfmError


@torch.no_grad()
def checkpoint_features(checkpoint: str | os.PathLike, classes: list[int], per_class: int = 200):
    """(features (N, d) of W_I F_I(x), labels (N,), class names, training counts)."""
    from lfm_ray.augment import BatchBuilder, DeviceImages
    from lfm_ray.config import RunConfig
    from lfm_ray.data import load_arrays, options_for
    from lfm_ray.model import LFMClassifier, build_clip
    from lfm_ray.train import load_state

    state = load_state(checkpoint, torch.device("cpu"))
    cfg = RunConfig.from_dict(state["config"])
    clip, spec = build_clip(cfg.model.name, cfg.model.pretrained, cfg.model.cache_dir, "cpu")
    data = cfg.data
    arrays = load_arrays(data.name, root=data.root, image_size=int(spec.size),
                         cache_dir=data.cache_dir,
                         **options_for(data.name, seed=data.seed, imbalance_factor=data.imbalance_factor))
    bad = [c for c in classes if not 0 <= c < arrays.num_classes]
    if bad:
        raise LfmError(f"class {bad[0]} is out of range 0..{arrays.num_classes - 1}")
    model = LFMClassifier(clip.visual, torch.zeros(arrays.num_classes, clip.visual.output_dim),
                          cfg.logit_scale)
    model.visual.load_state_dict(state["visual"])
    model.proj.load_state_dict(state["proj"])
    model.eval()
    images, labels = arrays.split("test")
    labels = np.asarray(labels)
    picked = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    build, store = BatchBuilder(spec, torch.device("cpu")), DeviceImages(images, torch.device("cpu"))
    feats = []
    for start in range(0, len(picked), 256):
        pos = torch.as_tensor(picked[start:start + 256])
        feats.append(model.proj(model.encode(build(store.gather(pos)))).float())
    return torch.cat(feats).numpy(), labels[picked], arrays.class_names, arrays.class_counts


def tsne_figure(feats: np.ndarray, labels: np.ndarray, names, counts, title: str):
    import plotly.graph_objects as go
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, len(feats) // 4)))
    xyz = TSNE(n_components=3, perplexity=perplexity, init="pca", random_state=0).fit_transform(feats)
    fig = go.Figure()
    for c in np.unique(labels):
        m = labels == c
        fig.add_trace(go.Scatter3d(x=xyz[m, 0], y=xyz[m, 1], z=xyz[m, 2], mode="markers",
                                   marker={"size": 3},
                                   name=f"{names[c]} (n={counts[c]} training images)"))
    fig.update_layout(title=title, template="plotly_white")
    return fig


def write_tsne(checkpoint: str | os.PathLike, classes: list[int], out=None, per_class: int = 200) -> Path:
    ckpt = Path(checkpoint)
    if not (ckpt / "state.pt").is_file():
        raise LfmError(f"{str(ckpt)!r} is not a checkpoint directory (no state.pt)")
    if len(classes) < 2:
        raise LfmError("--classes needs at least two classes")
    feats, labels, names, counts = checkpoint_features(ckpt, classes, per_class)
    fig = tsne_figure(feats, labels, names, counts, f"t-SNE of image features: {ckpt.name}")
    path = Path(out) if out else ckpt.parent / f"tsne_{ckpt.name}.html"
    fig.write_html(str(path), include_plotlyjs=True)
    return path
