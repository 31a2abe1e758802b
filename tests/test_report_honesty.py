"""What a report prints is what its data say: P named by its real source, one word for a
missing value, percentages in every table, intervals cut at 0 and 100 %; and --tsne takes
each class once (no Ray here)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lfm_ray import confusion
from lfm_ray.analysis import write_report
from lfm_ray.cli import main
from study_fixtures import NAMES, TAUS, confusion_counts, make_study, sampling_matrix


def page_text(folder: Path) -> str:
    page = Path(write_report(folder, png=False)).read_text()
    return html.unescape(re.sub(r"<script.*?</script>", "", page, flags=re.S))


@pytest.mark.parametrize("source, words", [
    ("uniform", "P of uniform partners (mix.similarity uniform)"),
    ("text", "P of the text features at"),
    ("image-prototypes", "P of the image prototypes"),
    ("file:/data/deep/sim/s.npy", "P of the similarity file …/sim/s.npy"),
    (None, "P of the run's class similarity (its source is not recorded"),
])
def test_the_p_caption_names_the_source_p_came_from(tmp_path, source, words):
    folder = make_study(tmp_path, "p", {"mix.tau": TAUS}, seeds=(0, 1))
    for trial in (folder / "trials").iterdir():
        confusion.write(trial / "confusion.npz", confusion_counts([0.5] * 10),
                        sampling_matrix(0.05), class_names=NAMES, split="test", epoch=4,
                        tau=0.05, source=source)
    text = page_text(folder)
    assert words in text
    if source != "text":
        assert "P of the text features" not in text


def test_missing_values_and_percentages_read_the_same_in_every_table(tmp_path):
    folder = make_study(tmp_path, "m", {"mix.tau": TAUS}, seeds=(0, 1), failed=1)
    table = pd.read_csv(folder / "trials.csv")
    done = table["status"] == "TERMINATED"
    table["macro_f1"] = np.where(done, 0.4321 + 0.01 * np.arange(len(table)), np.nan)
    table.loc[table.index[0], "acc_few"] = np.nan  # a figure a finished trial lacks
    table.to_csv(folder / "trials.csv", index=False)
    text = page_text(folder)
    assert not re.search(r">\s*nan\s*<|\bnan\b", text)
    assert "n/a" in text
    # macro-F1 in percent in the trials table as in the class-figures table.
    assert "macro_f1 (%)" in text and "43.21" in text and ">0.43<" not in text


def test_intervals_are_cut_at_0_and_100(tmp_path):
    from lfm_ray.analysis.report import interval_text

    assert interval_text(-96.33, 221.33) == "[0.00, 100.00] cut at 0 and 100 %"
    assert interval_text(40.0, 60.0) == "[40.00, 60.00]"
    spread = {0: 0.05, 1: 0.95}  # two seeds far apart: the interval passes both ends

    def acc(params, seed):
        v = spread[seed] if float(params["mix.tau"]) == 0.05 else 0.5
        return {"acc_many": v, "acc_medium": v, "acc_few": v, "acc_all": v}

    text = page_text(make_study(tmp_path, "ci", {"mix.tau": TAUS}, seeds=(0, 1), acc=acc))
    for low, high in re.findall(r"t-interval \[(-?[\d.]+), (-?[\d.]+)\]", text):
        assert 0 <= float(low) <= float(high) <= 100


def test_tsne_takes_each_class_once(tmp_path, capsys):
    from lfm_ray.analysis.tsne import resolve_classes
    from lfm_ray.errors import LfmError

    with pytest.raises(LfmError, match="given twice"):
        resolve_classes(["0", "0", "3"], NAMES)
    with pytest.raises(LfmError, match="given twice"):
        resolve_classes(["0", "zero"], NAMES)
    assert resolve_classes(["0", "three"], NAMES) == [0, 3]
    assert main(["report", "--tsne", str(tmp_path), "--classes", "0,0,3"]) == 2
