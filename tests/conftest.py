"""Shared test settings: tests import each other's fabricators from this folder; tests
marked `slow` (whole studies, interrupts, full training runs, the README's first command) or
`cluster` (real multi-node Ray clusters) run only with --slow, which .ci/run gives, so that
`pytest` alone stays a few minutes long."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the slow end-to-end tests (marked slow or cluster; "
                          ".ci/run does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --slow (.ci/run does)")
    for item in items:
        if "slow" in item.keywords or "cluster" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for a test module (starting Ray costs seconds)."""
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
