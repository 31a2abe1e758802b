"""Within one layer the specific field wins over a stage shorthand, whatever the order, in
flags and files; a study's --grid or --space naming a field twice is refused (no Ray here)."""

from __future__ import annotations

import itertools

import pytest

from lfm_ray.commands.run_flags import config_layers, new_parser
from lfm_ray.commands.study_flags import add_study_flags
from lfm_ray.config import STAGE_SHORTHANDS, ConfigLayers, RunConfig, read_config_file
from lfm_ray.errors import LfmError

# A valid value per shorthand, and another for the specific field.
VALUES = {"alpha": (0.5, 1.5), "tau": (0.5, 0.1), "beta": (0.3, 0.7)}
# The short aliases of the shorthands (beta has none).
ALIASES = {"alpha": "--alpha", "tau": "--tau"}


def resolve_flags(argv: list[str]) -> RunConfig:
    parser = new_parser(prog="t")
    add_study_flags(parser, default_name="t")
    return config_layers(parser.parse_args(argv)).resolve()


@pytest.mark.parametrize("key", STAGE_SHORTHANDS)
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_specific_field_wins_over_its_shorthand_in_either_order(key, stage):
    short, specific = VALUES[key]
    other = "stage2" if stage == "stage1" else "stage1"
    pairs = [[f"--mix.{key}", str(short)], [f"--{stage}.{key}", str(specific)]]
    if key in ALIASES:
        pairs.append([ALIASES[key], str(short)])  # the alias is the same shorthand
    for order in itertools.permutations(pairs):
        cfg = resolve_flags([x for pair in order for x in pair])
        assert cfg.get(f"{stage}.{key}") == specific, order
        assert cfg.get(f"{other}.{key}") == short, order


@pytest.mark.parametrize("key", STAGE_SHORTHANDS)
def test_in_a_file_the_specific_field_wins_whatever_the_key_order(tmp_path, key):
    short, specific = VALUES[key]
    texts = [f"mix:\n  {key}: {short}\nstage2:\n  {key}: {specific}\n",
             f"stage2:\n  {key}: {specific}\nmix:\n  {key}: {short}\n",
             f"stage2.{key}: {specific}\nmix.{key}: {short}\n",
             f"mix.{key}: {short}\nstage2:\n  {key}: {specific}\n"]
    for i, text in enumerate(texts):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        cfg = ConfigLayers(file=read_config_file(path)).resolve()
        assert cfg.get(f"stage2.{key}") == specific, text
        assert cfg.get(f"stage1.{key}") == short, text


@pytest.mark.parametrize("key", STAGE_SHORTHANDS)
def test_override_and_from_dict_take_the_specific_field_in_any_order(key):
    short, specific = VALUES[key]
    for values in ({f"stage1.{key}": specific, f"mix.{key}": short},
                   {f"mix.{key}": short, f"stage1.{key}": specific}):
        cfg = RunConfig().override(values)
        assert (cfg.get(f"stage1.{key}"), cfg.get(f"stage2.{key}")) == (specific, short)
    nested = {"stage1": {key: specific}, "mix": {key: short}}
    cfg = RunConfig.from_dict(nested)
    assert (cfg.get(f"stage1.{key}"), cfg.get(f"stage2.{key}")) == (specific, short)


def test_a_higher_layers_shorthand_still_sets_both_stages():
    """Across layers the higher one wins as before: a flag's --tau over a file's stage2.tau."""
    cfg = ConfigLayers(file={"stage2.tau": 0.1}, flags={"mix.tau": 0.5}).resolve()
    assert cfg.stage1.tau == cfg.stage2.tau == 0.5


@pytest.mark.parametrize("flag, items", [
    ("--grid", ["mix.tau=0.01,0.05", "mix.tau=0.25"]),
    ("--grid", ["mix.tau=0.01", "mix.alpha=1", "mix.tau=0.01"]),
    ("--space", ["stage1.lr=loguniform:1e-4:1e-2", "stage1.lr=loguniform:1e-3:1e-1"]),
])
def test_a_study_field_given_twice_is_refused(tmp_path, capsys, flag, items):
    from lfm_ray.cli import main

    search = ["--search", "random"] if flag == "--space" else []
    argv = ["study", "--name", "twice", *search, "--dry-run",
            "--results-dir", str(tmp_path / "r"), "--storage-path", str(tmp_path / "s")]
    for item in items:
        argv += [flag, item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    field = items[0].partition("=")[0]
    assert f"{flag} {field}" in err and "twice" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_train_takes_smoke_below_the_flags(capsys):
    """The README lists --smoke for `lfm-ray train` too: one epoch per stage of a few steps,
    a layer the flags override."""
    import json

    from lfm_ray.cli import main
    from lfm_ray.config import SMOKE

    assert main(["train", "--smoke", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["stage1"]["epochs"] == SMOKE["stage1.epochs"] == 1
    assert cfg["runtime"]["max_steps_per_epoch"] == SMOKE["runtime.max_steps_per_epoch"]
    assert main(["train", "--smoke", "--stage1.epochs", "2", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["stage1"]["epochs"] == 2


def test_a_bad_shorthand_value_is_named_as_given(capsys):
    from lfm_ray.cli import main

    assert main(["train", "--mix.tau", "nan", "--dry-run"]) == 2
    assert "mix.tau='nan' is not valid" in capsys.readouterr().err


def test_a_value_out_of_bounds_is_named_by_the_shorthand_that_set_it(capsys):
    """`--mix.tau -1` sets both stages' τ; the refusal names mix.tau, not stage1.tau. A stage's
    own field set after the shorthand is named by its own name again."""
    from lfm_ray.cli import main
    from lfm_ray.config import RunConfig
    from lfm_ray.errors import LfmError

    assert main(["train", "--mix.tau", "-1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "mix.tau=-1.0 is not valid; expected a number > 0" in err and "stage1.tau" not in err
    cfg = RunConfig().override({"mix.tau": 1.0})
    cfg.set("stage2.tau", -2)
    with pytest.raises(LfmError, match=r"^stage2.tau=-2.0 is not valid"):
        cfg.validate()
    with pytest.raises(LfmError, match=r"^mix.beta=0.0 is not valid; expected a number > 0, or "
                                       r"null for the method's own law"):
        RunConfig().override({"mix.beta": 0, "stage1.beta": 0.5}).validate()


def test_a_study_script_names_a_bad_shorthand_as_given(tmp_path, capsys):
    """The study scripts build each trial's config from the base's values; a bad --mix.tau is
    still refused as mix.tau (the τ script in its branch protocol, with nothing written)."""
    from lfm_ray.commands.catalog import tau_sweep

    where = ["--results-dir", str(tmp_path / "r"), "--storage-path", str(tmp_path / "ray")]
    assert tau_sweep.main(["--mix.tau", "-1", *where]) == 2
    err = capsys.readouterr().err
    assert "mix.tau=-1.0 is not valid; expected a number > 0" in err and "stage1.tau" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "ray").exists()


def test_every_declared_bound_is_checked_and_shown_in_help():
    """Each field's bounds live in its `setting`; validation refuses a value just outside
    them and --help shows them, with the field's unit."""
    import dataclasses

    from lfm_ray.commands.run_flags import add_run_flags, new_parser
    from lfm_ray.config import SECTIONS, RunConfig, bounds_text, field_type
    from lfm_ray.errors import LfmError

    bounded = 0
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if bounds_text(meta) is None:
                continue
            bounded += 1
            low = meta.get("at_least", meta.get("above"))
            outside = (low - 1 if "at_least" in meta else low) if low is not None \
                else (meta["at_most"] + 1 if "at_most" in meta else meta["below"])
            if field_type(cls, f.name)[0] is float:
                outside = float(outside)
            with pytest.raises(LfmError, match=rf"^{section}.{f.name}=.* is not valid"):
                RunConfig().override({f"{section}.{f.name}": outside}).validate()
    assert bounded >= 30
    parser = new_parser()
    add_run_flags(parser)
    text = " ".join(parser.format_help().split())
    assert "[float; default 0.05; > 0]" in text                     # stage1.tau
    assert "[int (epochs); default 20; >= 0]" in text               # stage1.epochs
    assert "default 0.9999; in [0, 1)]" in text                     # loss.cb_beta
