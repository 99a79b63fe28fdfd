"""A step that fails the same way every time is reported, not retried forever."""

import json

import pytest

from raylane.orchestrator.coordinator import Coordinator, RunFailed
from raylane.orchestrator.worker_group import WorkerFailure
from tests.conftest import small_cfg


class _Events:
    def __init__(self):
        self.events = []

    def event(self, step, name, **fields):
        self.events.append((step, name, fields))


def _counter(tmp_path, limit):
    coord = Coordinator.__new__(Coordinator)  # only the failure bookkeeping, no workers
    coord.cfg = small_cfg(tmp_path, f"cluster.max_step_failures={limit}")
    coord.metrics, coord._failures = _Events(), {}
    return coord


def test_a_step_failing_max_step_failures_times_in_a_row_raises_with_the_workers_error(tmp_path):
    coord = _counter(tmp_path, 3)
    failure = WorkerFailure(errored={1}, errors={1: "ValueError: no z for n=4, f=3"})
    coord._count_failure(5, failure)
    coord._count_failure(5, failure)
    with pytest.raises(RunFailed, match=r"step 5 failed 3 times in a row.*worker 1: ValueError: no z"):
        coord._count_failure(5, failure)
    assert coord.metrics.events[-1][1] == "run_failed"


def test_failures_of_different_steps_do_not_add_up(tmp_path):
    coord = _counter(tmp_path, 2)
    for step in (3, 4, 5, 6):  # each step fails once, then gets past: transient faults
        coord._count_failure(step, WorkerFailure(dead={0}))
    assert coord.metrics.events == []


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_run_whose_every_sync_fails_stops_with_run_failed(ray_cluster, tmp_path):
    # a NaN outer gradient raises in every DiLoCo sync (from step 2 on): recovery restores the
    # step-1 checkpoint, the sync fails again, and the run stops instead of retrying forever
    cfg = small_cfg(tmp_path, "strategy=diloco", "strategy.sync_every=2", "train.steps=4", "checkpoint.every=1",
                    "cluster.num_workers=2", "cluster.collective_timeout_s=5", "cluster.max_step_failures=2",
                    "+faults.events=[{kind: byzantine, rank: 1, step: 2, until: 4, mode: 'nan'}]")
    coord = Coordinator(cfg)
    try:
        with pytest.raises(RunFailed, match="step 2 failed 2 times in a row"):
            coord.train()
    finally:
        coord.close()
    events = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e.get("event") == "run_failed"] == ["run_failed"]


def test_silent_workers_are_hung_once_every_answer_is_a_collective_timeout():
    from raylane.orchestrator.worker_group import _silent_ones_are_hung

    timed_out = WorkerFailure(errored={1, 2}, errors={1: "RuntimeError: [pair.cc:598] Timed out waiting 5000ms",
                                                      2: "RuntimeError: [pair.cc:598] Timed out waiting 5000ms"})
    assert _silent_ones_are_hung({}, timed_out)  # the peers waited the timeout on the silent one
    assert not _silent_ones_are_hung({"ref": 1.0}, timed_out)  # someone finished: the silent may be slow
    crashed = WorkerFailure(errored={1}, errors={1: "RuntimeError: Connection closed by peer"})
    assert not _silent_ones_are_hung({}, crashed)  # a crash, not a wait: the others get GRACE_S to answer
