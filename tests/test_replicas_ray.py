"""Multi-rank replicas end to end on the local Ray cluster: hsdp with DeepSpeed ZeRO-1 in 2 replicas x 2
ranks. A crashed rank of replica 1 is replaced and re-seeded from its peer shard in replica 0 (same
state key) with no step lost, and the run ends where ddp over 4 ranks ends (inner and outer SGD are
one averaged gradient step). Inner and outer bytes are reported apart."""

import json

import numpy as np
import pytest

from tests.conftest import small_cfg, train_and_collect
from tests.test_replicas import SGD, _reference

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]


def test_hsdp_deepspeed_recovers_a_lost_rank_from_the_peer_replica_with_no_step_lost(ray_cluster, tmp_path):
    cfg = small_cfg(tmp_path, *SGD, "train.steps=6", "strategy=hsdp", "strategy.engine=deepspeed",
                    "strategy.zero_stage=1", "cluster.ranks_per_replica=2", "cluster.collective_timeout_s=5",
                    "cluster.replace_timeout_s=60", "+faults.events=[{kind: crash, rank: 2, step: 4, mode: exit}]")
    _, params = train_and_collect(cfg)
    _, expected, _ = _reference(cfg, 6)
    for p in params:
        np.testing.assert_allclose(p.numpy(), expected, atol=1e-5)
    rows = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    recovered = [e for e in rows if e.get("event") == "recovered"]
    # rank 2 = replica 1's local rank 0: its shard comes from rank 0 (replica 0), and its fresh engine's
    # initial broadcast must not overwrite rank 3's parameters
    assert len(recovered) == 1 and recovered[0]["source"] == "peer (rank 0)"
    assert recovered[0]["steps_lost"] == 0 and recovered[0]["resume_step"] == 4
    step = [r for r in rows if r.get("step") == 6 and "comm/outer/bytes_sent" in r][-1]
    n = expected.size
    # across replicas: each of the 4 ranks all-reduces (2 ranks, Gloo) the half of the gradient it owns
    assert step["comm/outer/bytes_sent"] == pytest.approx(4 * 4 * n / 2, rel=0.02)
    assert step["deepspeed/bytes_sent"] == pytest.approx(4 * n + 4 * n / 2, rel=0.01)  # rank 0, inside
