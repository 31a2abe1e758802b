"""A training batch-norm layer never sees a batch (or micro-batch) of one image: the last
batch of an epoch is topped up from the start of the rank's order, and micro-batches keep at
least two images; without a training batch-norm layer the batches are as before."""

import torch

from lfm_ray.worker.loop import batchnorm_trains, micro_batches, step_positions


def test_step_positions_are_plain_slices_without_batchnorm():
    mine = torch.arange(129)
    got = [step_positions(mine, s, 64) for s in range(3)]
    assert [g.tolist() for g in got] == [list(range(64)), list(range(64, 128)), [128]]
    # more steps than one pass wraps, as before
    assert step_positions(mine, 3, 64).tolist() == list(range(63, 127))


def test_a_last_batch_of_one_is_topped_up_when_batchnorm_trains():
    mine = torch.tensor([5, 3, 9, 1, 7])
    assert step_positions(mine, 2, 2, min_batch=2).tolist() == [7, 5]  # 7, then the first
    assert step_positions(mine, 1, 2, min_batch=2).tolist() == [9, 1]  # full batches unchanged
    one = torch.tensor([4])
    assert step_positions(one, 0, 8, min_batch=2).tolist() == [4]      # nothing to add


def test_micro_batches_keep_two_images_each_when_batchnorm_trains():
    batch = torch.arange(7)
    assert [len(p) for p in micro_batches(batch, 3)] == [3, 3, 1]      # torch's chunk, as before
    parts = micro_batches(batch, 3, min_batch=2)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert torch.cat(parts).tolist() == batch.tolist()
    assert [len(p) for p in micro_batches(torch.arange(3), 2, min_batch=2)] == [3]
    assert [len(p) for p in micro_batches(torch.arange(8), 4, min_batch=2)] == [2, 2, 2, 2]


def test_batchnorm_trains_reads_the_modules_mode():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert batchnorm_trains(net.train())
    assert not batchnorm_trains(net.eval())
    assert not batchnorm_trains(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))


def test_a_batchnorm_model_trains_on_a_set_that_ends_on_one_image(tmp_path):
    """End to end, the default (fashion-lt, timm's ByobNet with batch norm): 1,485 training
    images at batch 28 end each epoch on one image, which PyTorch's batch norm refuses in
    training; the run finishes and writes its metrics."""
    from lfm_ray.cli import main
    from lfm_ray.data import build_dataset

    n = len(build_dataset("fashion-lt", None).train_labels)
    assert n % 28 == 1  # the case under test
    out = tmp_path / "run"
    assert main(["train", "--runtime.batch_size", "28", "--stage1.epochs", "1",
                 "--stage2.epochs", "1", "--runtime.num_workers", "0",
                 "--data.cache_dir", str(tmp_path / "cache"), "--output", str(out)]) == 0
    assert (out / "metrics.json").exists()
