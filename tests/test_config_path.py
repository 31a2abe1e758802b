"""One configuration path for every entry point: the layer order, presets per data set, exact
flags, --dry-run, fast --help (no Ray here; the study reruns are in test_study_rerun.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lfm_ray.cli import main
from lfm_ray.commands.run_flags import SHORT_NAMES, new_parser
from lfm_ray.commands.study_flags import (
    ScriptPlan, add_study_flags, requested_datasets, study_from_args,
)
from lfm_ray.config import (
    CHOICES, PRESETS, SMOKE, ConfigLayers, RunConfig, field_docs, known_fields, read_config_file,
)
from lfm_ray.errors import LfmError

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- the layers --------------------------------------------------------------------------------
def test_each_layer_overrides_the_ones_below_it():
    layers = ConfigLayers(
        preset="cifar100-lt",
        file={"stage1.lr": 0.1, "stage1.epochs": 7, "stage2.lr": 0.2, "mix.tau": 0.3},
        fixed={"stage1.epochs": 8, "mix.tau": 0.4},
        smoke={"stage1.epochs": 1, "runtime.max_steps_per_epoch": 3},
        flags={"runtime.max_steps_per_epoch": 5},
    )
    cfg = layers.resolve()
    assert cfg.stage2.epochs == PRESETS["cifar100-lt"]["stage2.epochs"]  # the preset
    assert cfg.stage1.lr == 0.1 and cfg.stage2.lr == 0.2                 # the file
    assert cfg.stage1.tau == cfg.stage2.tau == 0.4                        # the script's own
    assert cfg.stage1.epochs == 1                                         # --smoke
    assert cfg.runtime.max_steps_per_epoch == 5                           # flags
    assert cfg.model.name == "ViT-B-32"                                   # preset, untouched


def test_a_file_value_equal_to_a_default_is_kept(tmp_path):
    """The reported case: preset cifar100-lt + a YAML setting stage1.epochs 20 and lr 0.002
    (the built-in defaults) ran with the preset's 50 and 1e-6."""
    assert RunConfig().stage1.epochs == 20 and RunConfig().stage1.lr == 0.002
    path = write_yaml(tmp_path / "run.yaml", "stage1:\n  epochs: 20\n  lr: 0.002\n")
    cfg = ConfigLayers(preset="cifar100-lt", file=read_config_file(path)).resolve()
    assert (cfg.stage1.epochs, cfg.stage1.lr) == (20, 0.002)
    assert cfg.stage2.lr == PRESETS["cifar100-lt"]["stage2.lr"]


def test_a_paper_data_set_takes_its_preset_unless_none():
    auto = ConfigLayers(flags={"data.name": "cifar10-lt"}).resolve()
    assert (auto.stage1.lr, auto.model.name) == (1e-9, "ViT-B-32")
    off = ConfigLayers(preset="none", flags={"data.name": "cifar10-lt"}).resolve()
    assert off.stage1.lr == RunConfig().stage1.lr and off.model.name == "tiny"
    # The embedded default fashion-lt takes its own recipe; digits-lt has no preset.
    default = ConfigLayers().resolve()
    assert default.data.name == "fashion-lt" == RunConfig().data.name
    assert (default.model.name, default.model.text) == (
        PRESETS["fashion-lt"]["model.name"], "glove")
    digits = {"data.name": "digits-lt"}
    assert ConfigLayers(flags=digits).resolve() == RunConfig().override(digits)
    with pytest.raises(LfmError, match="unknown preset 'mnist'"):
        ConfigLayers(preset="mnist").resolve()


def test_study_scripts_carry_the_papers_backbone_on_cifar100():
    on = {"data.name": "cifar100-lt"}
    assert ConfigLayers(flags=on, study="alpha_sweep").resolve().model.name == "RN50"
    assert ConfigLayers(flags=on, study="tau_sweep").resolve().model.name == "ViT-B-16"
    assert ConfigLayers(flags=on, study="mixup_comparison").resolve().model.name == "ViT-B-16"
    assert ConfigLayers(flags=on, study="loss_comparison").resolve().model.name == "ViT-B-32"
    # A flag still wins over the preset's backbone.
    flags = {**on, "model.name": "ViT-L-14"}
    assert ConfigLayers(flags=flags, study="alpha_sweep").resolve().model.name == "ViT-L-14"


def test_a_study_over_several_data_sets_gives_each_its_own_preset(tmp_path):
    from lfm_ray.commands.catalog import optuna_search

    parser = new_parser()
    add_study_flags(parser, default_name="s")
    args = parser.parse_args(["--dataset", "cifar10-lt", "--dataset", "cifar100-lt",
                              "--data-root", str(tmp_path), "--stage2.epochs", "3"])
    args.datasets = requested_datasets(args)
    study = study_from_args(args, optuna_search.declare(args), script="optuna_search")
    assert study.space["data.name"].choices == ("cifar10-lt", "cifar100-lt")
    c10 = study.config_for({"data.name": "cifar10-lt"})
    c100 = study.config_for({"data.name": "cifar100-lt"})
    assert (c10.stage1.lr, c100.stage1.lr) == (1e-9, 1e-6)      # each its own preset
    assert c10.stage2.epochs == c100.stage2.epochs == 3          # the flag on top of both
    assert c10.mix.method == c100.mix.method == "lfm"            # the script's own setting
    assert set(study.base_configs()) == {"cifar10-lt", "cifar100-lt"}


def test_smoke_and_fixed_settings_of_a_script(tmp_path):
    from lfm_ray.commands.catalog import alpha_sweep

    parser = new_parser()
    add_study_flags(parser, default_name="a")
    path = write_yaml(tmp_path / "f.yaml", "mix:\n  tau: 0.9\nstage1:\n  epochs: 12\n")
    args = parser.parse_args(["--config", str(path), "--smoke", "--stage2.epochs", "2",
                              "--dataset", "digits-lt"])
    args.datasets = requested_datasets(args)
    study = study_from_args(args, alpha_sweep.declare(args), script="alpha_sweep")
    assert study.base.stage1.tau == 0.05            # alpha_sweep's τ over the file's
    assert study.base.stage1.epochs == SMOKE["stage1.epochs"]
    assert study.base.stage2.epochs == 2
    assert study.grid == {"mix.alpha": [0.0, 1.0]}  # digits-lt: both stages per value


# ---- flags ---------------------------------------------------------------------------------------
def test_every_field_has_a_dotted_flag_with_type_default_and_unit():
    parser = new_parser()
    add_study_flags(parser)
    text = parser.format_help()
    docs = field_docs()
    assert set(docs) == set(known_fields())
    for dotted, doc in docs.items():
        assert f"--{dotted} " in text, dotted
        assert doc["help"], f"{dotted} has no comment in config.py to serve as its help"
    assert "default 0.002" in text and "Adam learning rate" in text
    args = parser.parse_args(["--mix.tau", "0.05", "--tau", "0.05"])  # both spellings work
    assert vars(args)["set:mix.tau"] == "0.05"


def test_choices_follow_the_registries():
    from lfm_ray.data import DATASETS
    from lfm_ray.losses import LOSSES
    from lfm_ray.mixing import MIXERS

    assert set(CHOICES["data.name"]) == set(DATASETS)
    assert set(CHOICES["loss.name"]) == set(LOSSES)
    assert set(CHOICES["mix.method"]) == set(MIXERS)


@pytest.mark.parametrize("flags,needle", [
    (["--stage1.epoch", "3"], "unrecognized arguments: --stage1.epoch"),
    (["--tau", "0.1", "--mix.tau", "0.2"], "--tau '0.1' and --mix.tau '0.2' disagree"),
    (["--dataset", "digits-lt", "--dataset", "cifar10-lt"], "a run trains on one data set"),
    (["--stage1.lr", "inf"], "stage1.lr='inf' is not valid"),
    (["--data.imbalance_factor", "nan"], "data.imbalance_factor='nan' is not valid"),
])
def test_inexact_flags_are_refused(tmp_path, capsys, flags, needle):
    assert main(["train", "--dataset", "digits-lt", "--dry-run", "--output", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_json_true_is_not_an_integer(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"runtime": {"batch_size": True}}))
    with pytest.raises(LfmError, match="runtime.batch_size=True is not valid"):
        read_config_file(path)


# ---- --dry-run -----------------------------------------------------------------------------------
def test_train_dry_run_prints_the_resolved_config_alone(tmp_path, capsys):
    path = write_yaml(tmp_path / "run.yaml", "stage1:\n  epochs: 20\n  lr: 0.002\n")
    code = main(["train", "--dry-run", "--preset", "cifar100-lt", "--config", str(path),
                 "--dataset", "digits-lt", "--model", "tiny", "--model.pretrained", "null",
                 "--loss", "mms", "--output", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 0
    cfg = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert (cfg["stage1"]["epochs"], cfg["stage1"]["lr"]) == (20, 0.002)
    assert cfg["stage2"]["lr"] == PRESETS["cifar100-lt"]["stage2.lr"]
    assert cfg["loss"]["name"] == "mms" and cfg["data"]["name"] == "digits-lt"
    assert "preset cifar100-lt" in captured.err
    assert not (tmp_path / "o").exists()


def test_study_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from lfm_ray.commands.catalog import tau_sweep

    code = tau_sweep.main(["--dry-run", "--smoke",
                           "--storage-path", str(tmp_path / "ray"),
                           "--results-dir", str(tmp_path / "results")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = json.loads(captured.out)
    # The default: fashion-lt with its preset, the branch protocol, three seeds.
    assert plan["action"] == "new" and plan["trials"] == 2 * 3
    assert plan["grid"] == {"stage2.tau": [0.002, 0.01]} and plan["seeds"] == [0, 1, 2]
    base = plan["base_configs"]["fashion-lt"]
    assert base["stage1"]["epochs"] == 1 and base["mix"]["method"] == "lfm"
    assert base["model"]["text"] == "glove" and base["stage1"]["tau"] == 0.05
    assert "preset fashion-lt" in captured.err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "results").exists()


def test_dry_run_checks_the_data_and_weights(tmp_path, capsys):
    code = main(["train", "--dry-run", "--dataset", "cifar10-lt", "--preset", "none",
                 "--data-root", str(tmp_path / "missing")])
    assert code == 2
    assert "data root" in capsys.readouterr().err


# ---- speed of --help -------------------------------------------------------------------------------
def script_help(script: str, heavy: tuple[str, ...], timeout: float = 60
                ) -> subprocess.CompletedProcess:
    """`python studies/<script> --help` in a fresh interpreter; its last stdout line lists
    which of the `heavy` modules the help imported."""
    code = (f"import sys; sys.argv = [{script!r}, '--help']\n"
            "import runpy\n"
            f"try:\n    runpy.run_path('studies/{script}', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_script_help_imports_nothing_heavy():
    out = script_help("tau_sweep.py", ("torch", "ray", "pandas", "open_clip"))
    assert out.returncode == 0, out.stderr
    assert "--stage1.lr" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_short_names_are_aliases_of_real_fields():
    fields = set(known_fields())
    assert all(dotted in fields for dotted in SHORT_NAMES.values())


def test_script_plans_are_plain():
    from lfm_ray.commands.catalog import imbalance_sweep
    from lfm_ray.commands.catalog import loss_comparison
    from lfm_ray.commands.catalog import mixup_comparison
    from lfm_ray.commands.catalog import tau_sweep

    for module in (tau_sweep, loss_comparison, mixup_comparison, imbalance_sweep):
        parser = new_parser()
        add_study_flags(parser)
        args = parser.parse_args([])
        args.datasets = requested_datasets(args)
        plan = module.declare(args)
        assert isinstance(plan, ScriptPlan) and plan.grid
    assert tau_sweep.TAUS == [0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25]


def test_alpha_and_tau_sweeps_branch_stage2_on_the_paper_data_sets(tmp_path):
    from lfm_ray.commands.catalog import alpha_sweep
    from lfm_ray.commands.catalog import tau_sweep

    def plan_of(module, *flags):
        parser = new_parser()
        add_study_flags(parser)
        args = parser.parse_args(list(flags))
        args.datasets = requested_datasets(args)
        return module.declare(args)

    on_paper = plan_of(tau_sweep, "--dataset", "cifar100-lt")
    assert on_paper.share_stage1 and on_paper.protocol == "branch"
    assert set(on_paper.grid) == {"stage2.tau"} and on_paper.fixed["mix.tau"] == 0.05
    full = plan_of(tau_sweep, "--dataset", "cifar100-lt", "--protocol", "full")
    assert not full.share_stage1 and set(full.grid) == {"mix.tau"}
    assert plan_of(tau_sweep).protocol == "branch"  # fashion-lt, the default, as the paper's
    assert plan_of(tau_sweep, "--dataset", "digits-lt").protocol == "full"  # both stages
    alpha = plan_of(alpha_sweep, "--dataset", "cifar10-lt")
    assert alpha.share_stage1 and set(alpha.grid) == {"stage2.alpha"}
    assert alpha.fixed["mix.alpha"] == 1.0


# ---- the terminal -----------------------------------------------------------------------------
def test_progress_bars_per_stage_show_epoch_loss_and_percent():
    import io

    from lfm_ray.progress import StageBars, describe

    stream = io.StringIO()
    bars = StageBars(RunConfig().override({"stage1.epochs": 3, "stage2.epochs": 2}), stream)
    bars.start()
    for epoch in range(1, 6):
        bars.update({"epoch": epoch, "stage": 1 if epoch <= 3 else 2, "train_loss": 0.5,
                     "acc_all": 0.25, "acc_few": 0.125})
    bars.close()
    lines = stream.getvalue().replace("\r", "\n")
    assert "stage 1" in lines and "3/3" in lines and "stage 2" in lines and "2/2" in lines
    assert "all 25.0 %" in lines and "few 12.5 %" in lines and "loss 0.5000" in lines
    # A run selecting on val leads with its val figure; NaN (test not yet run) is left out.
    text = describe({"train_loss": 1.0, "val_acc_all": 0.5, "acc_all": float("nan")})
    assert text == "loss 1.0000, val all 50.0 %"


def test_tunes_per_trial_tables_wait_for_verbose():
    """Not verbose, Tune's start and result tables need its verbose level (its status table
    and errors do not); verbose, its default level shows them again."""
    from ray.tune.experimental.output import AirVerbosity, TuneReporterBase

    from lfm_ray.driver.launch import show_tune_trial_tables

    try:
        show_tune_trial_tables(False)
        assert TuneReporterBase._start_end_verbosity == AirVerbosity.VERBOSE
        assert TuneReporterBase._heartbeat_threshold == AirVerbosity.DEFAULT
        show_tune_trial_tables(True)
        assert TuneReporterBase._start_end_verbosity == AirVerbosity.DEFAULT
    finally:
        show_tune_trial_tables(True)


def test_relative_paths_are_read_from_where_the_run_started(tmp_path):
    from lfm_ray.config import with_absolute_paths

    (tmp_path / "weights.pt").write_bytes(b"")
    cfg = RunConfig().override({"data.root": "data/cifar", "data.cache_dir": "~/c",
                                "model.pretrained": "openai", "aux.root": "digits-aux",
                                "aux.neighbours": "maps/n.json", "model.cache_dir": "/abs"})
    files = with_absolute_paths(cfg, str(tmp_path))
    assert files.data.root == str(tmp_path / "data" / "cifar")
    assert files.aux.neighbours == str(tmp_path / "maps" / "n.json")
    assert files.data.cache_dir == "~/c" and files.model.cache_dir == "/abs"  # already absolute
    assert files.model.pretrained == "openai" and files.aux.root == "digits-aux"  # names
    assert cfg.data.root == "data/cifar"  # the configuration as given is left alone
    local = with_absolute_paths(cfg.copy().override({"model.pretrained": "weights.pt",
                                                     "aux.root": "./aux"}), str(tmp_path))
    assert local.model.pretrained == str(tmp_path / "weights.pt")
    assert local.aux.root == str(tmp_path / "aux")
