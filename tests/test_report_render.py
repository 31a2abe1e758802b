"""The report opens in real headless Chromium with no network and its figures render."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from lfm_ray.analysis import write_report

from test_analysis import fake_study  # noqa: E402  (tests/ is on sys.path under pytest)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    report = write_report(fake_study(tmp_path))
    url = report.resolve().as_uri()
    profile = tmp_path / "profile"
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                    "--window-size=1200,1400", "--virtual-time-budget=8000", url],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    non_white = (pixels < 240).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert non_white > 0.02 and colours > 50, (non_white, colours)
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                          "--virtual-time-budget=8000", url],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 2      # Plotly drew its SVG layers
    assert "scatterlayer" in dom and "best mix.tau" in dom
