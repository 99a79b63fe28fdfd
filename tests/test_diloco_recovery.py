"""Streaming DiLoCo survives a worker crash: its replicas differ, so recovery restores the newest
checkpoint (with a sync in flight) and reruns the lost steps; with deterministic data and the
workers' RNG states in the checkpoint the run ends with the parameters of a fault-free run. The
driver's `finish` merges the sync still in flight at the end, so the final checkpoint holds none."""

import json

import pytest
import torch

from raylane.orchestrator import checkpoint
from tests.conftest import small_cfg, train_and_collect

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]

# H=4, P=2, tau=3: fragment 1 starts at 2, 6, 10 (merged at 5, 9, 13), fragment 0 at 4, 8 (7, 11):
# the step-5 checkpoint holds fragment 0's sync in flight; fragment 1's of step 10 is in flight at the end.
COMMON = ["train.steps=10", "checkpoint.every=5", "cluster.num_workers=2", "model.n_layer=2",
          "strategy=streaming_diloco", "strategy.sync_every=4", "strategy.overlap_steps=3",
          "cluster.collective_timeout_s=5", "cluster.replace_timeout_s=20"]


def _run(cfg) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(global parameters, local parameters) of each replica at the end."""
    coord, glob, states = train_and_collect(cfg, "flat_parameters", "state_dict")
    assert coord.step == 10
    local = [torch.cat([t.reshape(-1) for t in s["replica"]["model"].values()]) for s in states]
    return glob, local


@pytest.fixture(scope="module")
def fault_free(ray_cluster, tmp_path_factory):
    return _run(small_cfg(tmp_path_factory.mktemp("ff"), *COMMON, "run.name=fault-free"))


def test_diloco_recovers_a_crash_from_its_checkpoint_with_the_parameters_of_a_fault_free_run(fault_free, tmp_path):
    crashed = small_cfg(tmp_path, *COMMON, "run.name=crashed", "+faults.events=[{kind: crash, rank: 1, step: 8, "
                                                                                "mode: exit}]")
    glob, local = _run(crashed)
    ff_glob, ff_local = fault_free
    for a, b in zip(glob + local, ff_glob + ff_local):
        assert torch.equal(a, b)
    assert not torch.equal(local[0], local[1]), "replicas should differ (merge_alpha=0.5)"
    events = [json.loads(x) for x in (crashed.run.path() / "metrics.jsonl").read_text().splitlines()]
    recovered = [e for e in events if e.get("event") == "recovered"]
    assert len(recovered) == 1 and recovered[0]["source"] == "checkpoint"
    assert recovered[0]["resume_step"] == 6 and recovered[0]["steps_lost"] == 2  # steps 6, 7 run again
    path, meta = checkpoint.latest(crashed.run.path() / "checkpoints")
    assert path.name.endswith("10")
    for r in range(2):
        outer = checkpoint.load_part(path, f"replica_{r}")["strategy"]["outer"]
        assert outer["in_flight"] == [], "the driver's finish merges the step-10 sync before the checkpoint"


def test_diloco_recovers_a_crash_before_its_first_checkpoint_from_the_step_0_one(fault_free, tmp_path):
    """Replicas differ, so no live peer can seed the lost one: the run saved step 0 before training."""
    crashed = small_cfg(tmp_path, *COMMON, "run.name=early", "+faults.events=[{kind: crash, rank: 0, step: 3, "
                                                                              "mode: exit}]")
    glob, local = _run(crashed)
    for a, b in zip(glob + local, fault_free[0] + fault_free[1]):
        assert torch.equal(a, b)
    events = [json.loads(x) for x in (crashed.run.path() / "metrics.jsonl").read_text().splitlines()]
    recovered = [e for e in events if e.get("event") == "recovered"]
    assert len(recovered) == 1 and recovered[0]["source"] == "checkpoint" and recovered[0]["resume_step"] == 1
