"""The GPU path pinned to the CPU path: batches built on the device, and a bf16 stage-1 epoch
against the fp32 one on the CPU (same data, pairs, flips and λ: every draw is on the CPU
generator). Skipped without CUDA; they need no Ray, so they run on a bare GPU machine."""

from __future__ import annotations

import pytest
import torch

from lfm_ray.config import DataConfig, RunConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_batches_built_on_the_gpu_match_the_cpu():
    from lfm_ray.augment import BatchBuilder
    from lfm_ray.model import ImageSpec

    spec = ImageSpec(224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    cpu = BatchBuilder(spec, torch.device("cpu"))(images, flip=True,
                                                  generator=torch.Generator().manual_seed(3))
    gpu = BatchBuilder(spec, torch.device("cuda"))(images.cuda(), flip=True,
                                                   generator=torch.Generator().manual_seed(3))
    assert gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def _one_epoch(cfg: RunConfig, device: str):
    from lfm_ray.worker.loop import Run, Stage, prepare_stage, train_epoch
    from lfm_ray.worker.distributed import WorkerInfo

    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device(device)))
    stage = Stage(number=1, first_epoch=1, epochs=1)
    trainable, mixer, opt, sched = prepare_stage(run, stage, steps=3)
    loss = train_epoch(run, stage, 1, mixer, run.loss_fn(), opt, sched, trainable,
                       3, cfg.runtime.batch_size)
    run.model.eval()
    with torch.no_grad(), run.autocast:
        test_images = run.eval_sets["test"][0]
        logits = run.model(run.build(test_images.gather(torch.arange(32)))).float().cpu()
    return loss, logits


def test_a_bf16_epoch_on_the_gpu_matches_the_fp32_epoch_on_the_cpu(tmp_path):
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"runtime.batch_size": 32, "stage1.lr": 1e-4,
                                "data.cache_dir": str(tmp_path / "cache")})
    cpu_loss, cpu_logits = _one_epoch(cfg, "cpu")
    gpu_loss, gpu_logits = _one_epoch(cfg, "cuda")
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-2)
    # Logits are cosines (s = 1 for CE); bf16 keeps about 3 significant digits.
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=5e-3, rtol=0)


def test_the_compiled_encoder_gives_the_eager_logits(tmp_path):
    from lfm_ray.patch_embed import PatchConv2d
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo

    cache = str(tmp_path / "cache")
    info = WorkerInfo(rank=0, world_size=1, device=torch.device("cuda"))
    eager = Run(RunConfig(data=DataConfig("digits-lt")).override({"data.cache_dir": cache, "runtime.compile": False}), info)
    # runtime.compile None (the default): compiled on a GPU
    compiled = Run(RunConfig(data=DataConfig("digits-lt")).override({"data.cache_dir": cache}), info)
    assert compiled.model.visual._compiled_call_impl is not None
    assert eager.model.visual._compiled_call_impl is None
    assert isinstance(compiled.model.visual.conv1, PatchConv2d)  # the matmul patch embedding
    x = eager.build(eager.eval_sets["test"][0].gather(torch.arange(64)))
    with torch.no_grad(), eager.autocast:
        want, got = eager.model(x).float(), compiled.model(x).float()
    torch.testing.assert_close(got, want, atol=5e-3, rtol=0)
