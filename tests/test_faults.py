"""Faults on a local Ray cluster: each run finishes all steps, applies each exactly once, and
(deterministic data, live-peer recovery) ends with the parameters of a fault-free run."""

import json

import pytest
import ray
import torch

from raylane.orchestrator.coordinator import Coordinator
from tests.conftest import FAULT_FREE, small_cfg, train_and_collect

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]

STEPS = 12  # FAULT_FREE's; the faults below hit steps 3-5
# 3 s: the hang is caught after its peers' collective timeout; the fault presets' tests run 4 workers on it too
COMMON = [*FAULT_FREE, "cluster.collective_timeout_s=3", "cluster.replace_timeout_s=20"]


def _train(cfg):
    coord, params = train_and_collect(cfg)
    return coord.step, coord.samples, params


def _events(cfg):
    lines = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    return lines, [x for x in lines if "event" in x]


@pytest.fixture(scope="module")
def fault_free(fault_free_run):
    """The session's fault-free run (the timeouts in COMMON change no step's arithmetic)."""
    _, coord, params = fault_free_run
    return coord.step, coord.samples, params


@pytest.mark.parametrize("event", [
    "{kind: crash, rank: 1, step: 4, mode: exit}",
    "{kind: crash, rank: 2, step: 3, mode: collective}",
    "{kind: kill, rank: 3, step: 5}",
    "{kind: hang, rank: 0, step: 4, hang_s: 600}",
])
def test_fault_is_recovered_in_place_with_identical_parameters(fault_free, tmp_path, event):
    cfg = small_cfg(tmp_path, *COMMON, f"+faults.events=[{event}]")
    step, samples, params = _train(cfg)
    ff_step, ff_samples, ff_params = fault_free
    assert (step, samples) == (ff_step, ff_samples) == (STEPS, STEPS * 4 * cfg.data.batch_size)
    assert all(torch.equal(p, ff_params[0]) for p in params)
    lines, events = _events(cfg)
    kinds = [e["event"] for e in events]
    assert "fault_detected" in kinds and "recovered" in kinds
    recovered = next(e for e in events if e["event"] == "recovered")
    assert recovered["steps_lost"] == 0 and recovered["source"].startswith("peer")
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, STEPS + 1))


def test_elastic_shrink_to_3_and_grow_back_to_4_without_restart(ray_cluster, tmp_path):
    """A killed worker's CPU is taken by another job: the run shrinks to 3; when the CPU is
    freed the pending replacement joins at a step boundary."""
    blockers = []

    @ray.remote(num_cpus=1)
    class Blocker:
        def ready(self):
            return True

    def take_capacity(event, ranks, node):
        blockers.append(Blocker.remote())  # gets the killed worker's CPU once Ray releases it
        ray.get(blockers[0].ready.remote(), timeout=60)

    cfg = small_cfg(tmp_path, "train.steps=30", "cluster.num_workers=4", "cluster.cpus_per_worker=1.0",
                    "cluster.min_workers=3", "cluster.replace_timeout_s=3", "cluster.collective_timeout_s=5",
                    "+faults.events=[{kind: kill, rank: 2, step: 4}]")
    coord = Coordinator(cfg, fault_hook=take_capacity)
    try:
        coord.train(until_step=10)
        assert coord.group.world_size == 3
        for b in blockers:
            ray.kill(b)
        ray.wait([ref for _, ref in coord.recovery.pending], timeout=60)  # the replacement comes up
        coord.train()
        assert coord.group.world_size == 4 and coord.step == 30
    finally:
        coord.close()
    lines, events = _events(cfg)
    kinds = [e["event"] for e in events]
    assert kinds.index("recovered") < kinds.index("grown")
    assert next(e for e in events if e["event"] == "recovered")["workers"] == 3
    assert next(e for e in events if e["event"] == "grown")["workers"] == 4
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, 31))
    workers = [x["train/workers"] for x in lines if "train/loss" in x]
    assert workers[:3] == [4, 4, 4] and 3 in workers and workers[-1] == 4


def test_slow_worker_is_named_from_collective_timings(ray_cluster, tmp_path):
    cfg = small_cfg(tmp_path, "train.steps=12", "cluster.num_workers=4", "faults.outlier_window=4",
                    "+faults.events=[{kind: straggler, rank: 1, straggler: {model: fixed, delay_s: 0.4}}]")
    _train(cfg)
    _, events = _events(cfg)
    outliers = [e for e in events if e["event"] == "outlier"]
    assert [e["rank"] for e in outliers] == [1]
    assert outliers[0]["compute_s"] > 3 * outliers[0]["peers_s"]
