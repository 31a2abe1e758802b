"""The report opens in real headless Chromium, with no network, and its figures render; the
headline PNGs are written through kaleido where a Chromium exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfm_ray.analysis import write_report

from study_fixtures import TAUS, make_study, separated_accuracy  # noqa: E402  (conftest.py)

CHROMIUM = next((c for c in ("/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if c and Path(c).exists()), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]
# Line colours of the ablation curve's shot groups (figures.COLORS): many, few, all.
LINE_COLOURS = {"many": (31, 119, 180), "few": (214, 39, 40), "all": (44, 160, 44)}
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; "
                             ".ci/run installs it)")


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          check=True, capture_output=True, text=True, timeout=120)


@NEEDS_CHROMIUM
def test_report_renders_in_headless_chromium(tmp_path):
    study = make_study(tmp_path, "tau_sweep", {"mix.tau": TAUS}, seeds=(0, 1, 2),
                       acc=separated_accuracy, stopped=(1,), failed=1)
    report = write_report(study, png=False)
    url = report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    # Tall enough to hold the record, the tables and the ablation curve below them.
    _chromium(f"--screenshot={shot}", "--window-size=1200,2000", url, profile=tmp_path / "p1")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    non_white = (pixels < 235).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert non_white > 0.03 and colours > 100, (non_white, colours)
    for group, rgb in LINE_COLOURS.items():  # the curves themselves were drawn
        near = (np.abs(pixels - np.array(rgb)).sum(axis=2) < 40).sum()
        assert near > 100, (group, near)

    dom = _chromium("--dump-dom", url, profile=tmp_path / "p2").stdout
    # ablation, per-class accuracy, P beside the confusion matrix, γ′, learning curves
    assert dom.count("js-plotly-plot") >= 5
    assert dom.count('class="main-svg"') >= 10  # Plotly drew its SVG layers for each
    assert dom.count('class="scatterlayer') >= 4
    assert "best τ = 0.05 (by acc_all)" in dom  # the legend entry of the starred best value
    assert "τ (log scale)" in dom and ">0.002<" in dom  # the axis names the symbol and scale
    assert "stopped at epoch 2" in dom  # the ASHA-stopped trial's marker text
    assert "stage 1 | stage 2" in dom


@NEEDS_CHROMIUM
def test_headline_pngs_are_written_where_chromium_exists(tmp_path, capsys):
    from lfm_ray.analysis.report import png_blocker

    assert png_blocker() is None, png_blocker()  # kaleido is a dependency, Chromium is here
    study = make_study(tmp_path, "tau_sweep", {"mix.tau": TAUS}, seeds=(0, 1),
                       acc=separated_accuracy)
    write_report(study)
    assert "warning" not in capsys.readouterr().out
    sizes = {p.name: Image.open(p).size for p in study.glob("*.png")}
    assert sizes == {"ablation_mix.tau.png": (1100, 620), "per_class.png": (1100, 620),
                     "gamma_mix.tau.png": (1100, 620), "sampling_confusion.png": (1000, 520)}
    pixels = np.asarray(Image.open(study / "ablation_mix.tau.png").convert("RGB")).astype(int)
    near = (np.abs(pixels - np.array(LINE_COLOURS["all"])).sum(axis=2) < 40).sum()
    assert near > 100  # the curve, not a blank page
