"""cluster.reuse_workers: a finished run's healthy worker processes serve the driver's next run (a sweep,
a test session), rebuilt as fresh workers are, so the next run's bits do not depend on it."""

import pytest
import ray

from raylane.orchestrator import worker_group
from raylane.orchestrator.coordinator import Coordinator
from tests.conftest import small_cfg

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _run(cfg) -> tuple[list[int], float, list[float]]:
    """(worker pids, final eval loss, rank 0's fingerprint) of one run."""
    coord = Coordinator(cfg, True)
    try:
        pids = [a["pid"] for a in coord.group.addresses]
        summary = coord.train()
        prints = ray.get(coord.group.actors[0].fingerprint.remote())
    finally:
        coord.close()
    return pids, summary.eval_loss, prints


def test_the_next_run_reuses_the_processes_and_matches_a_run_on_fresh_ones(ray_cluster, tmp_path):
    base = ["cluster.num_workers=2", "train.steps=4", "train.eval_every=4", "strategy=diloco", "strategy.sync_every=2"]
    worker_group._POOL.clear()
    fresh = _run(small_cfg(tmp_path / "a", *base, "seed=3"))
    other = _run(small_cfg(tmp_path / "b", *base, "seed=5"))  # a different run in between, on the same processes
    warm = _run(small_cfg(tmp_path / "c", *base, "seed=3"))
    assert sorted(other[0]) == sorted(fresh[0]) == sorted(warm[0])  # the same two processes served all three
    assert warm[1:] == fresh[1:] and other[1:] != fresh[1:]
    cold = _run(small_cfg(tmp_path / "d", *base, "seed=3", "cluster.reuse_workers=false"))
    assert not set(cold[0]) & set(warm[0]) and cold[1:] == fresh[1:]
    assert not worker_group._POOL.idle  # reuse off: nothing kept
