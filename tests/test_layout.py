"""The strategy layout: what each rank holds (state keys), the named groups it joins, and how
recovery plans copies from live peers. No Ray: TrainWorkers as plain objects in threads."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from raylane import strategies
from raylane.orchestrator.coordinator import saved_state_keys
from raylane.orchestrator.recovery import peer_plan
from raylane.strategies.base import Layout, WorkerStrategy, register
from tests.conftest import small_cfg
from tests.multiproc import run_workers_in_threads


class PairsWorker(WorkerStrategy):
    """Plain SGD on the world's averaged gradient, plus one sum inside each pair of ranks."""

    @classmethod
    def layout(cls, cfg: Any, world_size: int) -> Layout:
        pairs = tuple(tuple(range(i, min(i + 2, world_size))) for i in range(0, world_size, 2))
        return Layout(("replica",) * world_size, (None,) * world_size, {"pair": pairs})

    def train_step(self, batch, lr: float) -> dict[str, Any]:
        loss = self.ctx.loss(batch)
        loss.backward()
        mine = torch.tensor([float(self.ctx.rank)])
        pair = self.ctx.comms["pair"]
        pair.allreduce(mine)
        return {"loss": loss.item(), "pair_sum": mine.item(), "pair_rank": pair.rank, "pair_size": pair.world_size}

    def evaluate(self, num_shards: int) -> dict[str, tuple[float, int]]:
        one = torch.ones(1)
        self.ctx.comms["pair"].allreduce(one)  # evaluation's bytes are not training traffic
        return {"model": (float(one.item()), 1)}


register("_test_pairs", strategies.get("ddp").config_cls, PairsWorker)


def test_default_layout_keeps_the_replica_bit():
    ddp = strategies.get("ddp").worker_cls.layout(None, 3)
    spec = strategies.get("diloco")
    diloco = spec.worker_cls.layout(spec.config_cls(), 3)
    assert ddp.state_keys == ("replica",) * 3 and ddp.parts == (None,) * 3 and ddp.groups == {}
    assert diloco.state_keys == ("replica_0", "replica_1", "replica_2") and diloco.seeds is None
    peer = spec.worker_cls.layout(spec.config_cls(recover_from="peer_replica"), 3)
    assert peer.state_keys == diloco.state_keys and peer.seeds == ("replica",) * 3
    assert spec.worker_cls.layout(spec.config_cls(recover_from="peer_replica", overlap_steps=1), 3).seeds is None
    assert saved_state_keys({"world_size": 2, "replicas_identical": False}) == ["replica_0", "replica_1"]
    assert saved_state_keys({"world_size": 2, "state_keys": ["s0", "s1"]}) == ["s0", "s1"]


def test_layout_rejects_overlapping_groups():
    with pytest.raises(AssertionError):
        Layout(("a", "a"), (None, None), {"g": ((0, 1), (1,))})


def test_peer_plan_copies_from_the_lowest_live_holder_at_the_newest_common_step():
    same = Layout(("r",) * 4, (None,) * 4)
    assert peer_plan(same, {0: 5, 2: 6, 3: 6}) == (6, {0: 2, 1: 2})
    stages = Layout(("s0", "s0", "s1", "s1"), (None,) * 4)  # two stages, two ways each (a hybrid)
    assert peer_plan(stages, {0: 7, 2: 7, 3: 7}) == (7, {1: 0})
    assert peer_plan(stages, {0: 7, 1: 7}) is None  # stage 1 has no live holder
    # stage 0's only holder at step 7 is gone: the newest step every key has is 6
    assert peer_plan(stages, {1: 6, 2: 7, 3: 6}) == (6, {0: 1, 2: 3})
    assert peer_plan(Layout(("a", "b"), (None, None)), {}) is None


def test_peer_plan_seeds_a_lost_replica_from_a_clean_peer_replica_and_leaves_the_others_alone():
    # 2 replicas x 2 ranks, keys per (replica, shard), seed class per shard (replica_diloco)
    keys = ("q0s0", "q0s1", "q1s0", "q1s1")
    seeded = Layout(keys, (None,) * 4, seeds=("s0", "s1", "s0", "s1"))
    # rank 1 lost at step 7; rank 0 (its replica) failed the step; replica 1 completed it
    steps = {0: 6, 2: 7, 3: 7}
    assert peer_plan(seeded, steps, clean={2, 3}) == (7, {0: 2, 1: 3})
    # without seed classes replica 0's keys have no holder; at an outer sync every rank failed: no clean source
    assert peer_plan(Layout(keys, (None,) * 4), steps, clean={2, 3}) is None
    assert peer_plan(seeded, steps, clean=set()) is None
    # a rank that is not clean is copied to even when it reports the step; exact holders win over seeds
    assert peer_plan(seeded, {0: 7, 1: 7, 2: 7, 3: 7}, clean={1, 2, 3}) == (7, {0: 2})


def test_named_groups_are_formed_counted_and_kept_apart_from_evaluation(tmp_path):
    cfg = small_cfg(tmp_path, "strategy=ddp")
    cfg.strategy.name = "_test_pairs"

    def body(worker):
        first = worker.train_step(0, 0.1)
        ev = worker.evaluate(4)
        second = worker.train_step(0, 0.1)
        return first, ev, second
    results = run_workers_in_threads(cfg, 4, body)
    for r, (first, ev, second) in enumerate(results):
        pair = (0, 1) if r < 2 else (2, 3)
        assert (first["pair_sum"], first["pair_rank"], first["pair_size"]) == (sum(pair), pair.index(r), 2)
        assert ev["model"] == (2.0, 1)
        # 4 bytes each way in a pair of Gloo ranks; evaluation's allreduce is not in the next step
        assert first["group_bytes_sent"] == {"pair": 4} and second["group_bytes_sent"] == {"pair": 4}
        assert first["bytes_sent"] == second["bytes_sent"] == 4  # the world group sent nothing


def test_a_hang_fires_at_the_first_collective_of_a_named_group(tmp_path):
    """The fault harness hooks every group of the generation, not only the world group: a strategy
    whose traffic is all in named groups still meets `hang` (and `crash: collective`) faults."""
    from raylane.workers.chaos import Directive

    cfg = small_cfg(tmp_path, "strategy=ddp")
    cfg.strategy.name = "_test_pairs"

    def body(worker):
        directive = Directive(hang_s=0.4) if worker.rank == 0 else None
        return worker.run(directive, 1, "train_step", 0, 0.1)
    results = run_workers_in_threads(cfg, 2, body)
    assert results[0]["pair_sum"] == results[1]["pair_sum"] == 1.0
    assert results[0]["step_time_s"] >= 0.4 and results[1]["comm_wait_s"] >= 0.3  # rank 1 waited in the pair
