"""Multi-rank replicas end to end on the local Ray cluster: hsdp with DeepSpeed ZeRO-1 and ZeRO-3 in 2
replicas x 2 ranks. A crashed rank of replica 1 is replaced and re-seeded from its peer shard in replica 0
(same state key) with no step lost, its replica-mate rebuilds its engine keeping its own partition, and
the run ends where ddp over 4 ranks ends (inner and outer SGD are one averaged gradient step). Inner
and outer bytes are reported apart."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import small_cfg, train_and_collect
from tests.test_replicas import SGD, _reference

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_hsdp_deepspeed_recovers_a_lost_rank_from_the_peer_replica_with_no_step_lost(ray_cluster, tmp_path,
                                                                                     zero_stage):
    """ZeRO-3: the replica's parameters were partitioned over the lost group; rank 3 keeps its fp32
    partition through the rebuild, rank 2's comes from rank 0 (key shard_0). The final parameters
    (gathered inside each replica) equal ddp's to float tolerance (another reduction order), and
    with ZeRO-3 those of the same run without the fault bit for bit."""
    common = [*SGD, "train.steps=6", "strategy=hsdp", "strategy.engine=deepspeed", f"strategy.zero_stage={zero_stage}",
              "cluster.ranks_per_replica=2", "cluster.collective_timeout_s=5", "cluster.replace_timeout_s=60"]
    cfg = small_cfg(tmp_path, *common, "+faults.events=[{kind: crash, rank: 2, step: 4, mode: exit}]")
    _, params = train_and_collect(cfg, "full_parameters")
    _, expected, _ = _reference(cfg, 6)
    for p in params:
        np.testing.assert_allclose(p.numpy(), expected, atol=1e-5)
    if zero_stage == 3:
        _, fault_free = train_and_collect(small_cfg(tmp_path / "fault_free", *common), "full_parameters")
        assert all(torch.equal(p, q) for p, q in zip(params, fault_free))
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
    # rank 0, inside, counted as DeepSpeed issues them. ZeRO-1: gradient all-reduce + parameter all-gather
    # after the step; ZeRO-3: parameter all-gather in the forward (kept for the backward: this model is
    # within its reuse distance) + gradient reduce-scatter, which Gloo runs as an all-reduce of the whole
    # gradient (measured at step 6: 122,312 B = 4n/2 + 4n + the 8-byte norm)
    inside = {1: 4 * n + 4 * n / 2, 3: 4 * n / 2 + 4 * n}[zero_stage]
    assert step["deepspeed/bytes_sent"] == pytest.approx(inside, rel=0.01)
