"""The benchmark at tiny sizes: every CPU key present, sane values. The speed-ups it
measures are pinned to the plain paths by the mixing and training tests."""

from __future__ import annotations

import json

from lfm_ray.cli import main

CPU_KEYS = ("sampler_speedup", "stage2_cost_ratio", "trial_overhead_s", "sweep_speedup",
            "laptop_overhead_ratio", "data_share_ratio")


def test_bench_smoke_writes_every_cpu_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in CPU_KEYS:
        assert key in result and result[key] > 0, key
    assert result["machine"]["cpus"] >= 1 and "torch" in result["machine"]
    assert set(result["targets_met"]) >= set(CPU_KEYS)
    assert "sampler_speedup" in capsys.readouterr().out
