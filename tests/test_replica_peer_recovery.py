"""replica_diloco's recovery per replica (issue 15), end to end on the local Ray cluster: 2 replicas x 2
ranks, H = 4. Rank 1 (replica 0) crashes at step 6, between two outer syncs. Replica 1 completes the
step, so the step stands: replica 0 is re-seeded shard by shard from replica 1 (no checkpoint exists:
checkpoint.every=0), replica 1 keeps its state, and at the end (step 7, before the next sync) replica 1
equals a fault-free run's bit for bit while replica 0 is one step of its own data past the copy."""

import json

import pytest
import torch

from tests.conftest import small_cfg, train_and_collect

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]

RUN = ("train.steps=7", "strategy=replica_diloco", "strategy.sync_every=4", "cluster.ranks_per_replica=2",
       "cluster.collective_timeout_s=5", "cluster.replace_timeout_s=60")


def _leaves(tree) -> list:
    """Every tensor and plain value of a state dict, in key order."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree, key=str) for x in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                      for x, y in zip(la, lb))


def test_a_lost_rank_restarts_its_replica_from_the_live_peer_replica_and_the_other_replica_keeps_its_state(
        ray_cluster, tmp_path):
    _, clean = train_and_collect(small_cfg(tmp_path / "clean", *RUN), "state_dict")
    cfg = small_cfg(tmp_path / "fault", *RUN, "+faults.events=[{kind: crash, rank: 1, step: 6, mode: exit}]")
    _, faulted = train_and_collect(cfg, "state_dict")

    # replica 1 untouched: model, inner optimizer, outer state, engine shard, bit for bit
    assert _same(faulted[2]["replica"], clean[2]["replica"]) and _same(faulted[3]["replica"], clean[3]["replica"])
    model = [s["replica"]["model"] for s in faulted]
    assert _same(model[0], model[1])  # replica 0's ranks agree (each got its shard's copy, then one step)
    assert not _same(model[0], clean[0]["replica"]["model"]) and not _same(model[0], model[2])
    rows = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    recovered = [e for e in rows if e.get("event") == "recovered"]
    assert len(recovered) == 1 and recovered[0]["source"] == "peer replicas (ranks 2, 3)"
    assert recovered[0]["steps_lost"] == 0 and recovered[0]["resume_step"] == 7
    logged = [r["step"] for r in rows if "train/loss" in r]
    assert logged == list(range(1, 8))  # step 6 stands, logged once, from the replica that completed it
    assert [r["train/workers"] for r in rows if r.get("step") == 6 and "train/loss" in r] == [2]
    assert not any(e.get("event") == "rewound" for e in rows)  # nothing went back to a checkpoint
