"""A real two-node Ray cluster on this machine: a smoke study's trials land on both nodes."""

from __future__ import annotations

import pytest

from lfm_ray.config import RunConfig
from lfm_ray.study import Study, run_study


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_smoke_study_uses_both_nodes(tmp_path, two_nodes):
    import ray

    base = RunConfig().override({
        "stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 2,
        "data.cache_dir": str(tmp_path / "cache"),
    })
    study = Study(name="two_nodes", base=base, grid={"mix.tau": [0.01, 0.05]}, seeds=[0],
                  storage_path=str(tmp_path / "ray"), results_dir=str(tmp_path / "results"),
                  address=two_nodes.address)
    table = run_study(study)
    assert len(ray.nodes()) == 2
    assert (table["status"] == "TERMINATED").all() and len(table) == 2
    # Each node has one CPU and each trial's worker needs one: the two ran side by side.
    assert table["node_id"].nunique() == 2
