"""The benchmark at tiny sizes: every CPU key present, sane values. The speed-ups it
measures are pinned to the plain paths by the mixing and training tests."""

from __future__ import annotations

import json

import pytest

from lfm_ray.cli import main

CPU_KEYS = ("sampler_speedup", "stage2_cost_ratio", "trial_overhead_s", "sweep_speedup",
            "laptop_overhead_ratio", "data_share_ratio", "shared_stage1_ratio",
            "study_overhead_growth", "sampler_speedup_inat", "cache_build_speedup",
            "cache_memory_growth")


@pytest.mark.slow
def test_bench_smoke_writes_every_cpu_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in CPU_KEYS:
        assert key in result and result[key] > 0, key
    assert result["machine"]["cpus"] >= 1 and "torch" in result["machine"]
    # the shared stage 1 is compared with a full sweep of the same grid and seeds
    assert result["full_sweep_trials"] == result["shared_stage1_trials"] > 0
    from lfm_ray.commands.benchmarks import INFO

    assert set(result["targets_met"]) >= set(CPU_KEYS) - set(INFO)
    assert "sampler_speedup" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_figures_code_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    """The GPU part's own code (fabricated CIFAR-100 pickles, the trainer's epoch, packed
    trial processes, the reference DataLoader) on the CPU with the tiny model; CI has no GPU."""
    from lfm_ray.commands.benchmarks import bench_gpu

    out = bench_gpu(tmp_path, seconds=0.2, device="cpu", model="tiny", per_class=100, batch=16,
                    packed_trials=2, paper_batch=8, large_model="tiny")
    for key in ("gpu_images_per_s", "gpu_packed_images_per_s", "gpu_pre_resized_images_per_s",
                "gpu_reference_images_per_s", "gpu_speedup_vs_reference", "gpu_packed_ratio",
                "gpu_packed_speedup_b32", "gpu_vit_b16_images_per_s", "gpu_stage2_cost_ratio"):
        assert out[key] > 0, key
    assert out["gpu_name"] == "cpu"


def test_an_unknown_part_is_one_clear_error(capsys):
    assert main(["bench", "--only", "sampler,warp"]) == 2
    err = capsys.readouterr().err
    assert "unknown part 'warp'" in err and "sweep" in err and "Traceback" not in err


def test_the_help_names_every_part_the_bench_runs():
    """--help lists the parts from its own light copy; it must be the bench's list."""
    from lfm_ray.commands.benchmarks import PARTS
    from lfm_ray.commands.bench import PART_NAMES

    assert PART_NAMES == PARTS
