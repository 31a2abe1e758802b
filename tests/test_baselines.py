"""The long-tail baselines beside the losses (tests/test_losses.py): post-hoc logit adjustment,
the epoch samplers and where trained class weights start, each against a direct computation,
and the combinations a run refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfm_ray.config import RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.head_init import resolved_init
from lfm_ray.sampling import EpochSampler, class_probabilities
from lfm_ray.contract import RESULT_FILE
from lfm_ray.worker.loop import Run
from lfm_ray.worker.distributed import WorkerInfo, seeded_generator
from test_train import fit_local, small_config
from test_tta import check_against

CPU = torch.device("cpu")
TIMM_TEST = "timm:test_vit"


def eval_images(run: Run) -> torch.Tensor:
    images, _ = run.eval_sets["test"]
    return images.gather(torch.arange(len(images)))


# ---- post-hoc logit adjustment --------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_post_hoc_adjustment_takes_tau_log_prior_off_the_evaluation_logits(tmp_path, tau):
    cfg = small_config(tmp_path, **{"eval.logit_adjust_tau": tau, "model.logit_scale": 30.0})
    run = Run(cfg.validate(), WorkerInfo(0, 1, CPU))
    run.model.eval()
    with torch.no_grad():
        z = run.model(run.build(eval_images(run))).numpy()
    prior = np.asarray(run.class_counts, dtype=np.float64) / sum(run.class_counts)
    pred = (z - tau * np.log(prior)).argmax(1)
    assert (pred != z.argmax(1)).any()  # the adjustment changes predictions here
    check_against(run.evaluate("test"), run, pred)
    # Rarer classes gain: the adjusted predictions name the rarest class more often.
    rarest = int(np.argmin(run.class_counts))
    assert (pred == rarest).sum() >= (z.argmax(1) == rarest).sum()


def test_no_adjustment_by_default_and_tau_must_not_be_negative(tmp_path):
    run = Run(small_config(tmp_path).validate(), WorkerInfo(0, 1, CPU))
    assert RunConfig().eval.logit_adjust_tau == 0.0 and run.logit_adjustment is None
    with pytest.raises(LfmError, match=r"eval.logit_adjust_tau=-1.0 is not valid; expected a "
                                       r"number >= 0 \(0: no adjustment\)"):
        RunConfig().override({"eval.logit_adjust_tau": -1}).validate()


# ---- samplers ------------------------------------------------------------------------------------
def test_class_laws_of_the_samplers():
    counts = [100, 25, 4, 0]
    assert class_probabilities(counts, 1.0).tolist() == pytest.approx([100 / 129, 25 / 129,
                                                                        4 / 129, 0.0])
    assert class_probabilities(counts, 0.0).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    root = [10, 5, 2, 0]
    assert class_probabilities(counts, 0.5).tolist() == pytest.approx([r / 17 for r in root])


def test_instance_balanced_is_the_shuffle_the_trainer_always_drew():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 5)
    sampler = EpochSampler("instance-balanced", labels, 3)
    gen_a, gen_b = seeded_generator(3, 4), seeded_generator(3, 4)
    assert torch.equal(sampler.order(gen_a), torch.randperm(75, generator=gen_b))


@pytest.mark.parametrize("name,law", [("class-balanced", [1 / 3] * 3),
                                      ("square-root", [0.5, 0.3, 0.2])])
def test_balanced_samplers_draw_classes_by_their_law_and_images_uniformly(name, law):
    # counts 100, 36, 16: square roots 10, 6, 4
    labels = torch.tensor([0] * 100 + [1] * 36 + [2] * 16)[torch.randperm(152, generator=
                                                                          seeded_generator(0))]
    sampler = EpochSampler(name, labels, 3)
    draws = torch.cat([sampler.order(seeded_generator(1, e)) for e in range(300)])
    assert len(draws) == 300 * 152  # an epoch of N draws, as long as the shuffle's
    classes = labels[draws]
    share = torch.bincount(classes, minlength=3).double() / len(draws)
    assert share.tolist() == pytest.approx(law, abs=0.006)
    # Within a class every image alike.
    for k in range(3):
        per_image = torch.bincount(draws[classes == k], minlength=152)[labels == k].double()
        assert per_image.std() / per_image.mean() < 0.12
    # The same (seed, epoch): the same epoch, on every rank and after a resume.
    assert torch.equal(sampler.order(seeded_generator(1, 0)), draws[:152])


def test_a_stage_trains_on_its_samplers_positions(tmp_path):
    from lfm_ray.worker.loop import prepare_stage, stage_plan, train_epoch

    cfg = small_config(tmp_path, **{"mix.method": "none", "stage2.sampler": "class-balanced"})
    run = Run(cfg.validate(), WorkerInfo(0, 1, CPU))
    for stage in stage_plan(cfg):
        trainable, mixer, opt, sched = prepare_stage(run, stage, 3)
        seen: list[torch.Tensor] = []
        mixer.partners = lambda idx, y, g: seen.append(idx.clone())  # records, mixes nothing
        epoch = stage.first_epoch
        train_epoch(run, stage, epoch, mixer, run.loss_fn(), opt, sched, trainable, steps=3,
                    per_worker=16)
        name = "instance-balanced" if stage.number == 1 else "class-balanced"
        assert run.epoch_sampler(stage.number).name == name
        want = EpochSampler(name, run.train_labels, 10).order(seeded_generator(0, epoch))
        assert torch.equal(torch.cat(seen), want[:48])


def test_lfm_refuses_another_sampler_with_its_reason():
    for stage in ("stage1", "stage2"):
        cfg = RunConfig().override({"mix.method": "lfm", f"{stage}.sampler": "square-root"})
        with pytest.raises(LfmError, match=rf"{stage}.sampler='square-root' with "
                                           r"mix.method='lfm': LFM draws its first sample "
                                           r"uniformly over the training images"):
            cfg.validate()
    for method in ("none", "mixup", "remix", "cutmix", "concutmix"):
        RunConfig().override({"mix.method": method, "stage2.sampler": "class-balanced"}).validate()
    with pytest.raises(LfmError, match="stage1.sampler='balanced' is not valid; expected one of "
                                       "instance-balanced, class-balanced, square-root"):
        RunConfig().override({"mix.method": "none", "stage1.sampler": "balanced"}).validate()


def test_the_cli_refuses_lfm_with_a_class_balanced_stage_in_one_line(capsys):
    from lfm_ray.cli import main

    assert main(["train", "--mix", "lfm", "--stage2.sampler", "class-balanced", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage2.sampler='class-balanced'" in err
    assert main(["train", "--mix", "none", "--stage2.sampler", "class-balanced",
                 "--model.classifier_init", "auto", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stage2"]["sampler"] == "class-balanced"
    assert printed["stage1"]["sampler"] == "instance-balanced"


# ---- classifier initialisation ------------------------------------------------------------------
def _features_and_labels(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """model.encode of every unflipped training image, written out here."""
    run.model.eval()
    with torch.no_grad():
        images = run.train_images.gather(torch.arange(len(run.train_images)))
        return run.model.encode(run.build(images)).float(), run.train_labels


def test_class_mean_starts_the_class_weights_at_the_unit_class_means(tmp_path):
    from lfm_ray.head_init import initialise_classifier

    cfg = small_config(tmp_path, **{"stage1.finetune": "classifier",
                                    "model.classifier_init": "class-mean"})
    run = Run(cfg.validate(), WorkerInfo(0, 1, CPU))
    assert torch.equal(run.model.class_weights.detach(), run.model.text_features)  # as built
    feats, labels = _features_and_labels(run)
    direct = torch.stack([F.normalize(feats[labels == k].double().mean(0), dim=0)
                          for k in range(10)]).float()
    assert initialise_classifier(run) == "class-mean"
    assert torch.allclose(run.model.class_weights.detach(), direct, atol=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_starts_the_class_weights_at_lifts_logistic_regression(tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    from lfm_ray.head_init import initialise_classifier

    cfg = small_config(tmp_path, **{"stage1.finetune": "classifier",
                                    "model.classifier_init": "linear-probe"})
    run = Run(cfg.validate(), WorkerInfo(0, 1, CPU))
    feats, labels = _features_and_labels(run)
    probe = LogisticRegression(C=1.0, max_iter=100, class_weight="balanced")
    probe.fit(feats.numpy(), labels.numpy())
    direct = F.normalize(torch.as_tensor(probe.coef_, dtype=torch.float64), dim=1).float()
    assert initialise_classifier(run) == "linear-probe"
    assert torch.allclose(run.model.class_weights.detach(), direct, atol=1e-6)
    if probe.n_iter_.max() >= 100:  # LIFT's limit reached: the run says so
        assert "L-BFGS stopped at 100 iterations" in capsys.readouterr().out


def test_text_is_the_default_and_leaves_the_text_features(tmp_path):
    from lfm_ray.head_init import initialise_classifier

    cfg = small_config(tmp_path, **{"stage1.finetune": "classifier"})
    run = Run(cfg.validate(), WorkerInfo(0, 1, CPU))
    assert initialise_classifier(run) == "text"
    assert torch.equal(run.model.class_weights.detach(), run.model.text_features)


@pytest.mark.parametrize("init", ["class-mean", "linear-probe"])
def test_a_timm_head_starts_from_the_image_features_with_zero_bias(tmp_path, init):
    from lfm_ray.head_init import initialise_classifier

    cfg = small_config(tmp_path, **{"model.name": TIMM_TEST, "model.image_size": 32,
                                    "mix.method": "none", "model.classifier_init": init})
    run = Run(cfg.validate(), WorkerInfo(0, 1, CPU))
    feats, labels = _features_and_labels(run)
    assert initialise_classifier(run) == init
    W, b = run.model.proj.weight.detach(), run.model.proj.bias.detach()
    assert torch.equal(b, torch.zeros_like(b)) and W.shape == (10, feats.shape[1])
    assert torch.allclose(W.norm(dim=1), torch.ones(10), atol=1e-5)
    if init == "class-mean":
        direct = torch.stack([F.normalize(feats[labels == k].double().mean(0), dim=0)
                              for k in range(10)]).float()
        assert torch.allclose(W, direct, atol=1e-6)


def test_a_two_class_probe_gives_each_class_its_row():
    from lfm_ray.head_init import linear_probe_weights

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 3, generator=g) + 2, torch.randn(20, 3, generator=g) - 2])
    y = np.array([0] * 20 + [1] * 20)
    W = linear_probe_weights(x.numpy(), y, 2)
    assert torch.allclose(W[0], -W[1]) and float(W[1] @ (x[20:].mean(0) - x[:20].mean(0))) > 0


def test_classifier_init_refuses_what_has_no_trained_class_weights():
    from lfm_ray.backbones import check_family

    for values, needle in [
        ({"model.classifier_init": "class-mean"},
         "model.classifier_init='class-mean' starts trained class weights, but with "
         "stage1.finetune='full' the tiny model's class weights are the frozen class text "
         "features"),
        ({"model.name": TIMM_TEST, "model.classifier_init": "text"},
         "model.classifier_init='text' needs class text features"),
        # A timm tower with a text encoder classifies with the frozen word-vector features.
        ({"model.name": TIMM_TEST, "model.text": "glove", "model.classifier_init": "linear-probe"},
         "model.classifier_init='linear-probe' starts trained class weights, but with "
         "stage1.finetune='full' the timm:test_vit model's class weights are the frozen class "
         "text features"),
    ]:
        with pytest.raises(LfmError, match=needle):
            check_family(RunConfig().override(values).validate())
    for values, needle in [
        ({"model.classifier_init": "linear-probe", "runtime.zero_shot": True}, "zero-shot run"),
        ({"model.classifier_init": "linear-probe", "stage1.finetune": "classifier",
          "stage1.epochs": 0}, "stage1.epochs=0"),
        ({"model.classifier_init": "class-mean", "stage1.finetune": "classifier",
          "aux.root": "digits-aux"}, "auxiliary classes"),
        ({"model.classifier_init": "prototype"}, "model.classifier_init='prototype' is not "
                                                 "valid; expected one of auto, text, "
                                                 "class-mean, linear-probe"),
    ]:
        with pytest.raises(LfmError, match=needle):
            RunConfig().override(values).validate()
    check_family(RunConfig().override({"model.classifier_init": "text"}).validate())
    check_family(RunConfig().override({"model.name": TIMM_TEST,
                                       "model.classifier_init": "class-mean"}).validate())
    with_text = RunConfig().override({"model.name": TIMM_TEST, "model.text": "glove"}).validate()
    check_family(with_text.override({"model.classifier_init": "text"}))
    assert resolved_init(with_text) == "text"
    assert resolved_init(RunConfig().override({"model.name": TIMM_TEST})) == "random"


def test_config_json_records_the_classifier_init(capsys):
    from lfm_ray.cli import main

    assert main(["train", "--dataset", "digits-lt", "--stage1.finetune", "classifier",
                 "--model.classifier_init", "linear-probe", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["classifier_init"] == "linear-probe"
    assert printed["resolved"]["model.classifier_init"] == "linear-probe"
    assert main(["train", "--dataset", "digits-lt", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["resolved"]["model.classifier_init"] == "text"
    # The default (fashion-lt's timm tower with GloVe class features) classifies with them.
    assert main(["train", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["name"].startswith("timm:")
    assert printed["resolved"]["model.classifier_init"] == "text"


# ---- one run with all of them --------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_run_with_a_probe_head_a_crt_stage_and_adjusted_metrics(tmp_path):
    from lfm_ray.head_init import initialise_classifier
    from lfm_ray.worker.checkpoint import load_state

    # Stage 1 at a learning rate that leaves the class weights where they started.
    cfg = small_config(tmp_path, **{"stage1.finetune": "classifier",
                                    "model.classifier_init": "linear-probe",
                                    "stage1.lr": 1e-12, "stage1.min_lr": 1e-13,
                                    "mix.method": "none", "loss.name": "lade",
                                    "stage2.sampler": "class-balanced",
                                    "eval.logit_adjust_tau": 1.0})
    result = fit_local(cfg, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "epoch_0002" / RESULT_FILE).read_text())
    assert saved["classifier_init"] == "linear-probe" and saved["logit_adjust_tau"] == 1.0
    assert np.isfinite(result.metrics["acc_all"]) and np.isfinite(result.metrics["train_loss"])
    probe = Run(cfg.copy().validate(), WorkerInfo(0, 1, CPU))
    initialise_classifier(probe)
    after_stage1 = load_state(tmp_path / "ckpt" / "epoch_0001", CPU)["class_weights"]
    assert torch.allclose(after_stage1, probe.model.class_weights.detach(), atol=1e-6)
    assert not torch.allclose(after_stage1, probe.model.text_features, atol=1e-2)


# ---- the study ------------------------------------------------------------------------------------
def test_the_loss_comparison_runs_every_baseline(tmp_path):
    import sys
    from pathlib import Path
    from lfm_ray.commands.catalog import loss_comparison

    from lfm_ray.commands.run_flags import new_parser
    from lfm_ray.commands.study_flags import add_study_flags, study_from_args

    parser = new_parser()
    add_study_flags(parser, default_name="loss_comparison")
    args = parser.parse_args(["--storage-path", str(tmp_path / "ray"),
                              "--results-dir", str(tmp_path / "results")])
    plan = loss_comparison.declare(args)
    names = plan.grid["method"]
    assert {"CB", "GRW", "LADE", "CE + post-hoc LA", "CE + cRT",
            "CE + square-root sampling"} <= set(names)
    study = study_from_args(args, plan, script="loss_comparison")
    configs = {n: study.config_for({"method": n, "runtime.seed": 0}).validate() for n in names}
    assert {configs[n].loss.name for n in ("CB", "GRW", "LADE")} == {"cb", "grw", "lade"}
    assert configs["CE + post-hoc LA"].eval.logit_adjust_tau == 1.0
    assert configs["CE"].eval.logit_adjust_tau == 0.0
    crt = configs["CE + cRT"]
    assert (crt.stage1.sampler, crt.stage2.sampler) == ("instance-balanced", "class-balanced")
    root = configs["CE + square-root sampling"]
    assert (root.stage1.sampler, root.stage2.sampler) == ("square-root", "square-root")
    assert configs["LFM + CE"].mix.method == "lfm" and configs["LFM + CE"].stage1.sampler == \
        "instance-balanced"
