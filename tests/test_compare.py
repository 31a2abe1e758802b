"""`lfm-ray compare A B`: studies side by side, on fabricated results folders in the formats a
study writes: shared configurations with each study's mean and 95 % t-interval (checked
against scipy), the base-configuration differences read from study.json, INCOMPLETE marks,
and one error line for a study that is not there."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lfm_ray.analysis.compare import compare_studies, write_comparison
from lfm_ray.cli import main

from study_fixtures import GROUPS, TAUS, make_study  # noqa: E402


def shifted(params, seed):
    """A second setup: every τ 5 points lower, seed noise of ± 1 point."""
    b = {0.002: 0.45, 0.05: 0.55, 1.25: 0.50}[float(params["mix.tau"])] + 0.01 * (seed - 1)
    return {f"acc_{g}": b for g in GROUPS}


def two_studies(tmp_path):
    a = make_study(tmp_path / "a", "taus", {"mix.tau": TAUS}, seeds=(0, 1, 2))
    b = make_study(tmp_path / "b", "taus_b16", {"mix.tau": TAUS[1:]}, seeds=(0, 1, 2),
                   acc=shifted)
    meta = json.loads((b / "study.json").read_text())
    meta["base_config"]["model"]["name"] = "ViT-B-16"
    meta["base_config"]["stage2"]["lr"] = 0.5
    meta["versions"]["git_commit"] = "def5678"
    (b / "study.json").write_text(json.dumps(meta))
    return a, b


def test_shared_configurations_with_their_intervals(tmp_path):
    a, b = two_studies(tmp_path)
    comp = compare_studies([a, b])
    assert comp.params == ["mix.tau"] and comp.metric == "acc_all"
    assert sorted(k[0] for k in comp.shared) == [0.05, 1.25]   # 0.002 ran in A only
    assert comp.cells[(0.002,)][1] is None
    # B at τ = 0.05: 54, 55, 56 % -> mean 55, half-width t_{0.975, 2} · 1 / √3.
    mean, low, high, n = comp.cells[(0.05,)][1]
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert (mean, n) == (pytest.approx(55.0), 3)
    assert (low, high) == (pytest.approx(55 - half), pytest.approx(55 + half))
    # A from its trials.csv directly.
    t = pd.read_csv(a / "trials.csv")
    va = t.loc[t["mix.tau"] == 0.05, "acc_all"].to_numpy() * 100
    assert comp.cells[(0.05,)][0][0] == pytest.approx(va.mean())
    # What differs between the base configurations, read from each study.json.
    assert comp.headline.loc["backbone"].tolist() == ["tiny", "ViT-B-16"]
    assert comp.headline.loc["commit"].tolist() == ["abc1234", "def5678"]
    assert comp.headline.loc["data set"].tolist() == ["digits-lt", "digits-lt"]
    assert comp.headline.loc["preset"].tolist() == ["none", "none"]
    assert {"model.name", "stage2.lr"} <= set(comp.differences.index)
    assert "data.name" not in comp.differences.index


def test_cli_writes_the_page_and_the_summary(tmp_path, capsys):
    a, b = two_studies(tmp_path)
    out = tmp_path / "cmp.html"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    page = out.read_text()
    summary = out.with_suffix(".txt").read_text()
    assert "2 shared configuration(s)" in summary and summary.strip() in printed
    assert "backbone: taus: tiny; taus_b16: ViT-B-16" in summary
    assert "τ = 0.05: taus " in summary and "taus_b16 55.00, 95 % t-interval" in summary
    assert "plotly" in page and "What differs between the studies" in page
    assert "τ = 0.002 (not in every study)" in page and "<b>INCOMPLETE</b>" not in page


def test_a_missing_or_empty_study_is_one_line(tmp_path, capsys):
    a, _ = two_studies(tmp_path)
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study at" in err[0]
    empty = make_study(tmp_path / "c", "empty", {"mix.tau": TAUS}, seeds=(0,))
    t = pd.read_csv(empty / "trials.csv")
    t["status"] = "ERROR"
    t.to_csv(empty / "trials.csv", index=False)
    assert main(["compare", str(a), str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished trials" in err[0]
    assert main(["compare", str(a)]) == 2
    assert not (tmp_path / "compare.html").exists()


def test_an_interrupted_study_is_marked_incomplete(tmp_path):
    a, b = two_studies(tmp_path)
    meta = json.loads((b / "study.json").read_text())
    meta.update(status="interrupted", missing_trials=["mix.tau=1.25, seed=2"])
    (b / "study.json").write_text(json.dumps(meta))
    path, text = write_comparison([a, b], tmp_path / "x.html")
    assert "INCOMPLETE: taus_b16 has 1 unfinished trial(s)" in text
    assert "<b>INCOMPLETE</b> — study taus_b16" in path.read_text()
