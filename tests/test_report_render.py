"""The report opens in real headless Chromium, with no network, and its figures render."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfm_ray.analysis import write_report

from test_analysis import TAUS, make_study  # noqa: E402  (tests/ is on sys.path under pytest)

CHROMIUM = next((c for c in ("/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if c and Path(c).exists()), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]
# Line colours of the ablation curve's shot groups (figures.COLORS): many, few, all.
LINE_COLOURS = {"many": (31, 119, 180), "few": (214, 39, 40), "all": (44, 160, 44)}


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          check=True, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                             "(apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    study = make_study(tmp_path, "tau_sweep", {"mix.tau": TAUS}, stopped=(1,), failed=1)
    report = write_report(study, png=False)
    url = report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    # Tall enough to hold the tables and the ablation curve below them.
    _chromium(f"--screenshot={shot}", "--window-size=1200,1800", url, profile=tmp_path / "p1")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    non_white = (pixels < 235).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert non_white > 0.03 and colours > 100, (non_white, colours)
    for group, rgb in LINE_COLOURS.items():  # the curves themselves were drawn
        near = (np.abs(pixels - np.array(rgb)).sum(axis=2) < 40).sum()
        assert near > 100, (group, near)

    dom = _chromium("--dump-dom", url, profile=tmp_path / "p2").stdout
    assert dom.count("js-plotly-plot") >= 3  # ablation, learning curves, per-class accuracy
    assert dom.count('class="main-svg"') >= 6  # Plotly drew its SVG layers for each
    assert dom.count('class="scatterlayer') >= 3
    assert "best mix.tau=0.05" in dom  # the legend entry of the starred best value
    assert "stopped at epoch 2" in dom  # the ASHA-stopped trial's marker text
    assert "stage 1 | stage 2" in dom
