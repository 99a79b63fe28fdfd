"""Elastic multi-rank replicas: a replica whose lost rank cannot be replaced is dropped whole (its live
members killed) and training goes on with fewer replicas; it grows back only by whole replicas.

Unit tests pin the arithmetic (`surviving_units`, `joinable`), the layout's `unit` and the config
rule; the Ray tests take away the capacity a replacement needs (blocker actors) and check, by
equivalence with ddp over the same per-step worlds, that the surviving replica's state continues:
hsdp from live state, replica_diloco from a checkpoint restored onto the smaller world; both grow back
by a whole replica (replica_diloco's as a copy of a live replica)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch

from raylane import config
from raylane.orchestrator.recovery import Recovery, joinable, surviving_units
from raylane.strategies import get
from raylane.strategies.base import Layout
from raylane.validation import ConfigError
from tests.conftest import SMALL, small_cfg
from tests.test_replicas import SGD

pytestmark = pytest.mark.timeout(240)


# -- arithmetic, layout and config (no Ray) ----------------------------------------------------
def test_surviving_units_drops_every_unit_with_a_missing_rank_whole():
    assert surviving_units(4, {1}, 2) == [2, 3]
    assert surviving_units(6, {4}, 3) == [0, 1, 2]
    assert surviving_units(6, {0, 5}, 3) == []
    assert surviving_units(8, {2, 3}, 2) == [0, 1, 4, 5, 6, 7]  # two ranks of one unit: one unit dropped
    assert surviving_units(4, {2}, 1) == [0, 1, 3]  # flat layout: only the missing rank
    assert surviving_units(4, set(), 2) == [0, 1, 2, 3]


def test_joinable_counts_whole_units_that_fit():
    assert joinable(ready=1, room=2, unit=2) == 0  # half a replica does not join
    assert joinable(ready=3, room=4, unit=2) == 2
    assert joinable(ready=4, room=2, unit=2) == 2  # never beyond cluster.num_workers
    assert joinable(ready=5, room=4, unit=1) == 4
    assert joinable(ready=2, room=0, unit=2) == 0


def test_replica_layout_is_elastic_by_whole_replicas(tmp_path):
    cfg = config.load([*SMALL, f"run.root={tmp_path}", "strategy=hsdp", "cluster.ranks_per_replica=2",
                       "cluster.min_workers=2"])
    full, shrunk = (get("hsdp").worker_cls.layout(cfg.strategy, n) for n in (4, 2))
    assert full.elastic and full.unit == 2 and shrunk.unit == 2
    assert shrunk.groups == {"inner": ((0, 1),), "outer": ((0,), (1,))}  # one replica: outer groups of 1
    with pytest.raises(AssertionError):
        Layout(("a",) * 3, (None,) * 3, unit=2)  # a world is whole units


def test_min_workers_not_whole_replicas_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load([*SMALL, f"run.root={tmp_path}", "strategy=hsdp", "cluster.ranks_per_replica=2",
                     "cluster.min_workers=3"])
    assert "cluster.min_workers=3: must be a multiple of cluster.ranks_per_replica=2" in str(err.value)
    assert "\n" not in str(err.value)


def test_too_few_whole_units_is_a_one_line_recovery_error():
    coord = SimpleNamespace(group=SimpleNamespace(world_size=4),
                            cfg=SimpleNamespace(cluster=SimpleNamespace(floor=4), strategy=SimpleNamespace(name="hsdp")))
    layout = Layout(("replica",) * 4, (None,) * 4, unit=2)
    assert Recovery(coord)._shrink_error(4, layout) is None
    assert Recovery(coord)._shrink_error(2, layout) == (
        "only 2 workers (whole units of 2 ranks) after a fault; cluster.min_workers=4: lower it to continue "
        "with fewer, or add capacity")
    fixed = Layout(("replica",) * 4, (None,) * 4, elastic=False)
    assert "cannot continue with fewer" in Recovery(coord)._shrink_error(3, fixed)


# -- on the local Ray cluster ------------------------------------------------------------------
def _reference(cfg, worlds: list[int]) -> np.ndarray:
    """ddp in one process with `worlds[i]` ranks at step i + 1 (the data position continues): one SGD
    step on the mean of the ranks' losses. Returns the final flat parameters."""
    import dataclasses

    from raylane.workers.worker import TrainWorker

    w = TrainWorker(dataclasses.replace(cfg, strategy=get("ddp").config_cls()), 0)
    bs, offset = cfg.data.batch_size, 0
    for world in worlds:
        w.optimizer.zero_grad()
        losses = [w._loss(w.data.train_batch(w.sampler.indices(offset + r * bs, bs))) for r in range(world)]
        torch.stack(losses).mean().backward()
        w.optimizer.step()
        offset += world * bs
    return torch.cat([p.detach().reshape(-1) for p in w.model.parameters()]).numpy()


def _capacity_taker(blockers: list):
    """A fault hook: after the driver killed a worker, blocker actors take every free CPU of the 4-CPU
    session cluster (2 free + the killed worker's 0.5), so no replacement can be placed."""

    @ray.remote
    class Blocker:
        def ready(self) -> bool:
            return True

    def take(event, ranks, node):
        blockers.extend([Blocker.options(num_cpus=2).remote(), Blocker.options(num_cpus=0.5).remote()])
        ray.get([b.ready.remote() for b in blockers], timeout=60)

    return take


def _rows(cfg) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r], [r for r in rows if "event" in r]


@contextlib.contextmanager
def _elastic_run(cfg):
    """(coordinator, blockers) of a run whose fault hook takes the capacity away; both stopped after."""
    from raylane.orchestrator.coordinator import Coordinator

    blockers: list = []
    coord = Coordinator(cfg, fault_hook=_capacity_taker(blockers))
    try:
        yield coord, blockers
    finally:
        coord.close()
        for b in blockers:
            ray.kill(b)


def _grow_back_and_finish(coord, blockers: list) -> list:
    """Give the capacity back, let the whole pending replica come up, train to the end; every rank's
    parameters (the world is whole again)."""
    for b in blockers:
        ray.kill(b)
    ray.wait([ref for _, ref in coord.recovery.pending], num_returns=2, timeout=60)
    coord.train()
    assert coord.group.world_size == 4 and coord.step == coord.cfg.train.steps
    return coord.group.get(coord.group.call("flat_parameters"))


def _checked_rows(cfg, params: list, worlds: list[int]) -> tuple[list[dict], list[dict]]:
    """Every step logged once (none lost) with the given world sizes, and the parameters equal ddp's
    over those worlds; the step rows and the events."""
    steps, events = _rows(cfg)
    assert [r["step"] for r in steps] == list(range(1, len(worlds) + 1))
    assert [r["train/workers"] for r in steps] == worlds
    expected = _reference(cfg, worlds)
    for p in params:
        np.testing.assert_allclose(p.numpy(), expected, atol=1e-5)
    return steps, events


ELASTIC = ["cluster.ranks_per_replica=2", "cluster.min_workers=2", "cluster.replace_timeout_s=3",
           "cluster.collective_timeout_s=5", "+faults.events=[{kind: kill, rank: 1, step: 4}]"]


@pytest.mark.ray
def test_hsdp_drops_a_replica_that_lost_a_rank_continues_and_grows_back_by_a_whole_replica(ray_cluster, tmp_path):
    """2 replicas x 2 ranks; rank 1 (replica 0) is killed at step 4 and its CPU taken: replica 0 is
    dropped (rank 0 killed too), replica 1 goes on alone as ranks 0-1 from its live state; half a
    replica coming back does not join; once the capacity is back the whole replica rejoins."""
    cfg = small_cfg(tmp_path, *SGD, "train.steps=10", "strategy=hsdp", *ELASTIC)
    with _elastic_run(cfg) as (coord, blockers):
        coord.train(until_step=5)
        assert coord.group.world_size == 2 and len(coord.recovery.pending) == 2
        # the killed rank 0's CPU lets one of the two pending actors up: half a replica, which does not join
        ready, _ = ray.wait([ref for _, ref in coord.recovery.pending], num_returns=1, timeout=60)
        assert len(ready) == 1
        coord.train(until_step=7)
        assert coord.group.world_size == 2
        params = _grow_back_and_finish(coord, blockers)
    steps, events = _checked_rows(cfg, params, [4, 4, 4, 2, 2, 2, 2, 4, 4, 4])
    assert all(np.isfinite(r["train/loss"]) for r in steps)
    shrunk = next(e for e in events if e["event"] == "shrunk")
    assert (shrunk["dropped"], shrunk["killed"], shrunk["unit"], shrunk["workers"]) == ([0, 1], [0], 2, 2)
    recovered = next(e for e in events if e["event"] == "recovered")
    assert recovered["workers"] == 2 and recovered["steps_lost"] == 0 and recovered["resume_step"] == 4
    assert next(e for e in events if e["event"] == "grown")["workers"] == 4


@pytest.mark.ray
def test_replica_diloco_drops_a_replica_restores_the_checkpoint_onto_one_and_grows_back_from_a_copy(
        ray_cluster, tmp_path):
    """H=1, outer SGD lr=1 without momentum: replica_diloco is ddp over all ranks. The kill hits an
    outer sync, so the survivors restore the step-2 checkpoint: the one replica left loads replica 0's
    shards and redoes step 3 on 2 ranks. Once the capacity is back, a whole replica rejoins as a copy
    of the live one (seed classes `shard_<s>`), which keeps the run equal to ddp over 4 ranks."""
    cfg = small_cfg(tmp_path, *SGD, "train.steps=8", "strategy=replica_diloco", "strategy.sync_every=1",
                    "strategy.outer_lr=1", "strategy.outer_momentum=0", "checkpoint.every=2", *ELASTIC)
    with _elastic_run(cfg) as (coord, blockers):
        coord.train(until_step=5)
        assert coord.group.world_size == 2 and coord.step == 5
        params = _grow_back_and_finish(coord, blockers)
    _, events = _checked_rows(cfg, params, [4, 4, 2, 2, 2, 4, 4, 4])
    shrunk = next(e for e in events if e["event"] == "shrunk")
    assert (shrunk["dropped"], shrunk["killed"]) == ([0, 1], [0])
    recovered = next(e for e in events if e["event"] == "recovered")
    assert recovered["source"] == "checkpoint" and recovered["workers"] == 2 and recovered["resume_step"] == 3
    assert next(e for e in events if e["event"] == "grown")["step"] == 6
