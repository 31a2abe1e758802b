"""Stage 1's fine-tuning modes: which parameters train, the added modules' arithmetic against
direct computations, their counts in the metrics, and the refusal of non-ViT towers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray.config import DataConfig, FINETUNE_MODES, RunConfig, StageConfig
from lfm_ray.errors import LfmError
from lfm_ray.finetune import (
    MODES, AdaptFormerBlock, LoRABlock, PromptedVisionTransformer, SSFBlock, check_architecture,
    lift_width, prepare, trainable_names,
)
from lfm_ray.model import LFMClassifier, build_clip
from test_train import fit_local, small_config

CPU = torch.device("cpu")
BLOCKS, WIDTH, D, C = 2, 64, 64, 10   # the tiny ViT (lfm_ray/model_configs/tiny.json), digits-lt


@pytest.fixture(scope="module")
def tiny():
    return build_clip("tiny")


def classifier(tiny, mode: str | None = None, **sizes) -> LFMClassifier:
    """A classifier over a copy of the tiny tower (prepare changes a tower in place)."""
    clip, _ = tiny
    feats = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    model = LFMClassifier(copy.deepcopy(clip.visual), feats, 30.0)
    if mode is not None:
        prepare(model, StageConfig(finetune=mode, **sizes), C, "tiny")
    return model


def expected_names(mode: str, plain_tower: nn.Module) -> set[str]:
    """What stage 1 of `mode` must train, written out from the plain tower's parameter names."""
    tower = {f"visual.{n}" for n, _ in plain_tower.named_parameters()}
    blocks = [f"visual.transformer.resblocks.{i}" for i in range(BLOCKS)]
    return {
        "full": tower,
        "classifier": {"class_weights"},
        "bitfit": {n for n in tower if n.split(".")[-1] in ("bias", "in_proj_bias")},
        "lora": {f"{b}.lora_{w}.{p}" for b in blocks for w in "qv" for p in ("down", "up")},
        "adaptformer": {f"{b}.adapter.{p}" for b in blocks
                        for p in ("norm.weight", "norm.bias", "down.weight", "down.bias",
                                  "up.weight", "up.bias", "scale")},
        "vpt": {"visual.prompts.tokens"},
        "ssf": {f"{b}.ssf_{where}.{p}" for b in blocks
                for where in ("attn_in", "attn_out", "mlp_in", "mlp_out")
                for p in ("scale", "shift")},
    }[mode]


def expected_count(mode: str, plain_tower: nn.Module) -> int:
    """The number of trained values of stage 1, from the architecture (tiny: r = width = 2,
    LIFT's rule for 10 classes and 2 blocks; 10 prompts)."""
    r = 2
    return {
        "full": sum(p.numel() for p in plain_tower.parameters()),
        "classifier": C * D,
        # ln_pre, ln_post, and per block ln_1, ln_2, in-projection (3d), out-projection,
        # MLP in (4d) and out
        "bitfit": 2 * WIDTH + BLOCKS * (WIDTH * 2 + 3 * WIDTH + WIDTH + 4 * WIDTH + WIDTH),
        "lora": BLOCKS * 2 * (WIDTH * r + r * WIDTH),
        "adaptformer": BLOCKS * (2 * WIDTH + (WIDTH * r + r) + (r * WIDTH + WIDTH) + 1),
        "vpt": 10 * WIDTH,
        # a scale and a shift per output of the in-projection (3d), out-projection, MLP in (4d)
        # and MLP out
        "ssf": BLOCKS * 2 * (3 * WIDTH + WIDTH + 4 * WIDTH + WIDTH),
    }[mode]


# ---- names, sizes, refusals ---------------------------------------------------------------------
def test_the_modes_are_the_configs_choices():
    assert tuple(MODES) == FINETUNE_MODES
    assert RunConfig(data=DataConfig("digits-lt")).stage1.finetune == "full" and RunConfig(data=DataConfig("digits-lt")).stage2.finetune == "proj"


def test_lift_width_rule():
    # 2^max(0, floor(log2(C / (2 · blocks)))): ImageNet-LT, CIFAR-100, Places-LT on ViT-B
    assert lift_width(1000, 12) == 32 and lift_width(100, 12) == 4 and lift_width(365, 12) == 8
    assert lift_width(10, 2) == 2 and lift_width(10, 12) == 1 and lift_width(8142, 12) == 256


def test_tiny_is_an_open_clip_vit(tiny):
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = tiny[0].visual
    assert type(visual) is VisionTransformer
    assert all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks)


@pytest.mark.parametrize("mode", ["lora", "adaptformer", "vpt", "ssf"])
def test_vit_modes_refuse_other_towers(tiny, mode):
    from open_clip.modified_resnet import ModifiedResNet

    with pytest.raises(LfmError, match=rf"stage1.finetune={mode} .* ViT .*model RN50's image "
                                       r"tower is a ResNet"):
        check_architecture("RN50", mode)
    check_architecture("ViT-B-32", mode)
    check_architecture("tiny", mode)
    resnet = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=D, heads=2, image_size=32, width=8)
    model = LFMClassifier(resnet, torch.randn(C, D), 1.0)
    with pytest.raises(LfmError, match=r"image tower is ModifiedResNet. Use full, classifier "
                                       r"or bitfit"):
        prepare(model, StageConfig(finetune=mode), C, "a-resnet")


def test_full_classifier_and_bitfit_take_any_tower():
    from open_clip.modified_resnet import ModifiedResNet

    for mode in ("full", "classifier", "bitfit"):
        check_architecture("RN50", mode)
        resnet = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=D, heads=2, image_size=32, width=8)
        model = LFMClassifier(resnet, torch.randn(C, D), 1.0)
        prepare(model, StageConfig(finetune=mode), C)
        model.set_stage(1)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        if mode == "bitfit":  # BatchNorm and attention-pool biases; convolutions have none
            assert trained and all(n.endswith("bias") for n in trained)
        assert trained == set(trainable_names(model, 1))


def test_config_refuses_what_means_nothing():
    for values, needle in [
        ({"stage1.finetune": "prompt"}, "stage1.finetune='prompt' is not valid; expected one "
                                        "of full, classifier, bitfit, lora, adaptformer, vpt, "
                                        "ssf"),
        ({"stage2.finetune": "lora"}, "stage2.finetune='lora' is not valid; expected 'proj'"),
        ({"stage2.lora_rank": 4}, "stage2.lora_rank=4 is not valid; expected null"),
        ({"stage1.adapter_dim": 0}, "stage1.adapter_dim=0 is not valid"),
        ({"stage1.vpt_length": -1}, "stage1.vpt_length=-1 is not valid"),
    ]:
        with pytest.raises(LfmError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            RunConfig(data=DataConfig("digits-lt")).override(values).validate()
    RunConfig(data=DataConfig("digits-lt")).override({"stage1.finetune": "lora", "stage1.lora_rank": 8}).validate()


# ---- the added modules against direct computations ----------------------------------------------
def _attention(q, k, v, out_proj, heads):
    """Multi-head attention written out from q, k, v (B, L, d): per head
    softmax(q kᵀ / √d_h) v, the heads concatenated, then the out-projection."""
    B, L, d = q.shape
    split = lambda t: t.reshape(B, L, heads, d // heads).transpose(1, 2)  # noqa: E731
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (att @ split(v)).transpose(1, 2).reshape(B, L, d) @ out_proj.weight.t() + out_proj.bias


def test_lora_block_is_the_attention_with_low_rank_query_and_value_updates(tiny):
    model = classifier(tiny, "lora", lora_rank=3)
    block = model.visual.transformer.resblocks[0]
    assert isinstance(block, LoRABlock)
    # At the start B is zero (ΔW = 0) and A uniform in ±1/√r, as LIFT's init.
    assert torch.equal(block.lora_q.up, torch.zeros(3, WIDTH))
    assert block.lora_q.down.abs().max() <= 1 / math.sqrt(3) and block.lora_q.scale == 1 / 3
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 17, WIDTH, generator=g)
    plain = tiny[0].visual.transformer.resblocks[0]
    with torch.no_grad():
        assert torch.equal(block(t), plain(t))  # B = 0: the plain block at the start
        for lora in (block.lora_q, block.lora_v):
            lora.up.copy_(torch.randn(3, WIDTH, generator=g))
        attn = block.attn
        u = block.ln_1(t)
        w_q, w_k, w_v = attn.in_proj_weight.split(WIDTH)
        b_q, b_k, b_v = attn.in_proj_bias.split(WIDTH)
        lq, lv = block.lora_q, block.lora_v
        q = u @ w_q.t() + b_q + (u @ lq.down @ lq.up) / 3   # LIFT: q + (1/r) · x A B
        k = u @ w_k.t() + b_k
        v = u @ w_v.t() + b_v + (u @ lv.down @ lv.up) / 3
        h = t + _attention(q, k, v, attn.out_proj, attn.num_heads)
        direct = h + block.mlp(block.ln_2(h))
        assert torch.allclose(block(t), direct, atol=1e-5)
        assert not torch.allclose(block(t), plain(t), atol=1e-3)


def test_adaptformer_block_adds_a_scaled_bottleneck_beside_the_mlp(tiny):
    model = classifier(tiny, "adaptformer", adapter_dim=4)
    block = model.visual.transformer.resblocks[1]
    assert isinstance(block, AdaptFormerBlock)
    a = block.adapter
    assert torch.equal(a.up.weight, torch.zeros(WIDTH, 4)) and float(a.scale.detach()) == 1.0
    assert torch.equal(a.down.bias, torch.zeros(4)) and torch.equal(a.up.bias, torch.zeros(WIDTH))
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 17, WIDTH, generator=g)
    plain = tiny[0].visual.transformer.resblocks[1]
    with torch.no_grad():
        assert torch.equal(block(t), plain(t))  # up = 0: the plain block at the start
        a.up.weight.copy_(torch.randn(WIDTH, 4, generator=g))
        a.up.bias.copy_(torch.randn(WIDTH, generator=g))
        a.norm.weight.copy_(torch.rand(WIDTH, generator=g) + 0.5)
        a.scale.fill_(0.7)
        # h: the residual stream after attention (open_clip's own attention of the block)
        h = t + plain.attention(q_x=plain.ln_1(t))
        bottleneck = F.relu(F.layer_norm(h, (WIDTH,), a.norm.weight, a.norm.bias)
                            @ a.down.weight.t() + a.down.bias)
        direct = h + plain.mlp(plain.ln_2(h)) + 0.7 * (bottleneck @ a.up.weight.t() + a.up.bias)
        assert torch.allclose(block(t), direct, atol=1e-5)


def test_ssf_block_scales_and_shifts_the_outputs_of_its_four_linear_layers(tiny):
    model = classifier(tiny, "ssf")
    block = model.visual.transformer.resblocks[1]
    assert isinstance(block, SSFBlock)
    ssf = {w: getattr(block, f"ssf_{w}") for w in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    assert [m.scale.numel() for m in ssf.values()] == [3 * WIDTH, WIDTH, 4 * WIDTH, WIDTH]
    for m in ssf.values():  # the identity at the start
        assert torch.equal(m.scale.detach(), torch.ones_like(m.scale))
        assert torch.equal(m.shift.detach(), torch.zeros_like(m.shift))
    g = torch.Generator().manual_seed(5)
    t = torch.randn(2, 17, WIDTH, generator=g)
    plain = tiny[0].visual.transformer.resblocks[1]
    x = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(block(t), plain(t))
        assert torch.equal(model.visual(x), tiny[0].visual(x))  # full fine-tuning's forward
        for m in ssf.values():
            m.scale.copy_(1 + 0.3 * torch.randn(m.scale.shape, generator=g))
            m.shift.copy_(0.3 * torch.randn(m.shift.shape, generator=g))
        attn = block.attn
        u = block.ln_1(t)
        qkv = (u @ attn.in_proj_weight.t() + attn.in_proj_bias) * ssf["attn_in"].scale \
            + ssf["attn_in"].shift                        # LIFT: ssf(cat(q, k, v))
        q, k, v = qkv.split(WIDTH, dim=-1)
        h = t + _attention(q, k, v, attn.out_proj, attn.num_heads) * ssf["attn_out"].scale \
            + ssf["attn_out"].shift
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        m = (block.ln_2(h) @ fc.weight.t() + fc.bias) * ssf["mlp_in"].scale + ssf["mlp_in"].shift
        m = (F.gelu(m) @ proj.weight.t() + proj.bias) * ssf["mlp_out"].scale + ssf["mlp_out"].shift
        assert torch.allclose(block(t), h + m, atol=1e-5)
        assert not torch.allclose(block(t), plain(t), atol=1e-3)


def test_vpt_appends_prompts_after_ln_pre_and_pools_without_them(tiny):
    model = classifier(tiny, "vpt", vpt_length=5)
    visual = model.visual
    assert isinstance(visual, PromptedVisionTransformer)
    tokens = visual.prompts.tokens
    assert tokens.shape == (5, WIDTH)
    # Xavier-uniform over a patch's pixels (8 × 8 × 3) and the width, as LIFT
    assert tokens.abs().max() <= math.sqrt(6 / (3 * 8 * 8 + WIDTH))
    plain = tiny[0].visual
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embedded = plain._embeds(x)                        # 16 patches + class token
        seq = torch.cat([embedded, tokens.expand(3, -1, -1)], dim=1)
        assert seq.shape[1] == 17 + 5
        out = plain.transformer(seq)
        direct = plain.ln_post(out[:, 0]) @ plain.proj     # the class token, pooled
        assert torch.allclose(visual(x), direct, atol=1e-5)
        assert not torch.allclose(visual(x), plain(x), atol=1e-3)  # the prompts take part


def test_classifier_mode_trains_class_weights_initialised_from_the_text_features(tiny):
    model = classifier(tiny, "classifier")
    assert torch.equal(model.class_weights.detach(), model.text_features)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.class_weights.mul_(2.0).add_(0.1)            # w_k, no longer unit or f_T
        feats = model.encode(x)
        direct = 30.0 * F.normalize(feats, dim=1) @ F.normalize(model.class_weights, dim=1).t()
        assert torch.allclose(model.head(feats), direct, atol=1e-5)


# ---- the trainer: what receives gradients, what the optimiser holds, the counts -----------------
@pytest.mark.parametrize("mode", FINETUNE_MODES)
def test_exactly_the_modes_parameters_receive_gradients(tmp_path, tiny, mode):
    from lfm_ray.worker.loop import Run, prepare_stage, stage_plan, train_epoch
    from lfm_ray.worker.distributed import WorkerInfo

    cfg = small_config(tmp_path, **{"stage1.finetune": mode}).validate()
    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=CPU))
    params = dict(run.model.named_parameters())
    wanted = {1: expected_names(mode, tiny[0].visual), 2: {"proj.weight"}}
    counts = {1: expected_count(mode, tiny[0].visual), 2: D * D}
    for stage in stage_plan(cfg):
        run.model.zero_grad(set_to_none=True)
        trainable, mixer, opt, sched = prepare_stage(run, stage, 2)
        train_epoch(run, stage, stage.first_epoch, mixer, run.loss_fn(), opt, sched, trainable,
                    steps=2, per_worker=16)
        got = {n for n, p in params.items() if p.grad is not None}
        assert got == wanted[stage.number], (mode, stage.number)
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        assert held == {id(params[n]) for n in wanted[stage.number]}
        assert sum(params[n].numel() for n in got) == counts[stage.number]
        assert run.trained_params[f"trained_params_stage{stage.number}"] == counts[stage.number]


@pytest.mark.parametrize("mode", FINETUNE_MODES)
def test_each_mode_trains_end_to_end_and_records_its_count(tmp_path, tiny, mode):
    from lfm_ray.contract import RESULT_FILE
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo
    from lfm_ray.worker.checkpoint import load_state

    cfg = small_config(tmp_path, **{"stage1.finetune": mode})
    result = fit_local(cfg, tmp_path / "ckpt")
    assert result.metrics["trained_params_stage1"] == expected_count(mode, tiny[0].visual)
    assert result.metrics["trained_params_stage2"] == D * D
    saved = json.loads((tmp_path / "ckpt" / "epoch_0002" / RESULT_FILE).read_text())
    assert saved["trained_params_stage1"] == expected_count(mode, tiny[0].visual)
    size = {"lora": {"lora_rank": 2}, "adaptformer": {"adapter_dim": 2},
            "vpt": {"vpt_length": 10}}.get(mode, {})  # LIFT's defaults, resolved
    assert saved["finetune"] == {"mode": mode, **size}
    # From the initial weights (the trainer's, rebuilt) to the end of stage 1 only the
    # mode's parameters move; in stage 2 only W_I.
    start = Run(cfg.copy().validate(), WorkerInfo(0, 1, CPU)).model
    states = [start.weights()] + [load_state(tmp_path / "ckpt" / f"epoch_{e:04d}", CPU)
                                  for e in (1, 2)]

    def flat(state):
        out = {f"visual.{k}": v for k, v in state["visual"].items()}
        out["proj.weight"] = state["proj"]["weight"]
        if state.get("class_weights") is not None:
            out["class_weights"] = state["class_weights"]
        return out

    before, after_1, after_2 = (flat(s) for s in states)
    assert before.keys() == after_1.keys() == after_2.keys()
    wanted = expected_names(mode, tiny[0].visual)
    moved_1 = {k for k in before if not torch.equal(before[k], after_1[k])}
    assert moved_1 and moved_1 <= wanted, (mode, moved_1 - wanted)
    moved_2 = {k for k in before if not torch.equal(after_1[k], after_2[k])}
    assert moved_2 == {"proj.weight"}


def test_a_lightweight_run_resumes_as_an_uninterrupted_one(tmp_path):
    cfg = small_config(tmp_path, **{"stage1.finetune": "lora", "stage1.epochs": 2,
                                    "stage2.epochs": 1})
    from lfm_ray.worker.checkpoint import load_state

    full = fit_local(cfg, tmp_path / "full")
    fit_local(cfg, tmp_path / "part", stop_after_epoch=1)
    resumed = fit_local(cfg, tmp_path / "part", resume_from=str(tmp_path / "part" / "epoch_0001"))
    a = load_state(tmp_path / "full" / "epoch_0003", CPU)
    b = load_state(tmp_path / "part" / "epoch_0003", CPU)
    assert any("lora_q" in k for k in a["visual"])
    for k in a["visual"]:
        assert torch.allclose(a["visual"][k], b["visual"][k], atol=1e-6), k
    assert resumed.metrics["acc_all"] == pytest.approx(full.metrics["acc_all"], abs=1e-6)


# ---- the study -----------------------------------------------------------------------------------
def test_the_study_runs_every_mode_without_and_with_lfm(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    from lfm_ray.commands.catalog import finetune_modes

    from lfm_ray.commands.study_flags import add_study_flags, study_from_args
    from lfm_ray.commands.run_flags import new_parser

    parser = new_parser()
    add_study_flags(parser, default_name="finetune_modes")
    args = parser.parse_args(["--storage-path", str(tmp_path / "ray"),
                              "--results-dir", str(tmp_path / "results")])
    plan = finetune_modes.declare(args)
    assert len(plan.grid["method"]) == 18 and set(plan.variants) == set(plan.grid["method"])
    for name, mode in finetune_modes.MODES.items():
        assert plan.variants[name]["stage1.finetune"] == mode
        assert plan.variants[name]["mix.method"] == "none"
        assert plan.variants[f"{name} + LFM"]["mix.method"] == "lfm"
    assert set(finetune_modes.MODES.values()) == set(FINETUNE_MODES)  # every mode
    for name, init in finetune_modes.CLASSIFIER_INITS.items():
        for variant in (name, f"{name} + LFM"):
            assert plan.variants[variant]["stage1.finetune"] == "classifier"
            assert plan.variants[variant]["model.classifier_init"] == init
    study = study_from_args(args, plan, script="finetune_modes")
    for name in plan.grid["method"]:  # every trial's configuration is valid
        cfg = study.config_for({"method": name, "runtime.seed": 0}).validate()
        assert cfg.stage1.finetune == plan.variants[name]["stage1.finetune"]
    # --help answers without importing the heavy modules
    code = ("import sys; sys.argv = ['finetune_modes.py', '--help']\nimport runpy\n"
            "try:\n    runpy.run_path('studies/finetune_modes.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stderr
