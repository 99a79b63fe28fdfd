"""Recovery in place: replace what failed, re-form the group, bring state from a live peer.

`recover(failure, step)` after a failed round:
1. kill the dead and hung workers (and any that miss the heartbeat);
2. start a replacement for each at its rank; one not up within `cluster.replace_timeout_s`
   is dropped (elastic shrink, if `cluster.min_workers` allows) and kept pending to grow
   back when capacity returns (`maybe_grow`, at a step boundary). The layout's `unit` is kept
   whole: a unit (a multi-rank replica) with a rank not replaced is dropped whole, its surviving
   members killed and replaced by pending actors too (`shrunk` event; `surviving_units`), and
   growth joins whole units only (`joinable`);
3. form a new process-group generation in the living processes;
4. state: the strategy's layout says which state key each rank holds; when every key has a
   live holder at one common step (`peer_plan`), the ranks that need it copy it from that
   holder; else every rank restores the newest valid checkpoint. The coordinator rolls back to
   that step, so the failed step is run again and no update is applied twice or lost.
   A strategy whose failed step may leave a rank's state half-updated
   (`failed_step_keeps_state = False`, e.g. DiLoCo's local inner steps) always restores the
   checkpoint; one whose layout is not elastic never shrinks.
Every fault and recovery is an event in metrics.jsonl and a `faults/` metric.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from raylane.orchestrator.worker_group import WorkerFailure
from raylane.strategies.base import Layout

log = logging.getLogger(__name__)


class RecoveryError(RuntimeError):
    """Training cannot continue (too few workers, no state to recover from)."""


class Recovery:
    def __init__(self, coord: Any):
        self.coord = coord
        self.pending: list[tuple[Any, Any]] = []  # (actor, address ref) waiting for capacity

    # -- membership -------------------------------------------------------------------
    def _replace(self, lost: set[int], step: int) -> tuple[list[Any], list[dict]]:
        group, layout = self.coord.group, self.coord.layout()
        fresh = {r: group.new_actor(r) for r in sorted(lost)}
        refs = {r: a.address.remote() for r, a in fresh.items()}
        timeout = self.coord.cfg.cluster.replace_timeout_s
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        kept = surviving_units(group.world_size, {r for r in lost if refs[r] not in ready}, layout.unit)
        error = self._shrink_error(len(kept), layout)
        if error:
            self.pending += [(fresh[r], refs[r]) for r in sorted(lost)]  # abandon() reaps them
            raise RecoveryError(error)
        self._drop_units(step, [r for r in range(group.world_size) if r not in kept], lost, fresh, refs, layout.unit)
        actors = [fresh[r] if r in lost else group.actors[r] for r in kept]
        addresses = [ray.get(refs[r]) if r in lost else group.addresses[r] for r in kept]
        return actors, addresses

    def _shrink_error(self, kept: int, layout: Layout) -> str | None:
        """Why the world may not go on with `kept` workers (None: it may)."""
        world, c = self.coord.group.world_size, self.coord.cfg.cluster
        if kept < world and not layout.elastic:
            return (f"only {kept} of {world} workers after a fault, and strategy {self.coord.cfg.strategy.name!r} "
                    f"cannot continue with fewer: add capacity or raise cluster.replace_timeout_s")
        if kept < c.floor:
            whole = f" (whole units of {layout.unit} ranks)" if layout.unit > 1 else ""
            return (f"only {kept} workers{whole} after a fault; cluster.min_workers={c.floor}: lower it to "
                    f"continue with fewer, or add capacity")
        return None

    def _drop_units(self, step: int, dropped: list[int], lost: set[int], fresh: dict[int, Any],
                    refs: dict[int, Any], unit: int) -> None:
        """The ranks of the units dropped whole: kill their live members, and keep a fresh actor
        for each of their ranks pending, so that a unit may grow back whole when capacity returns."""
        if not dropped:
            return
        group = self.coord.group
        killed = [r for r in dropped if r not in lost]
        group.kill(set(killed))
        for r in killed:
            fresh[r] = group.new_actor(r)
            refs[r] = fresh[r].address.remote()
        self.pending += [(fresh[r], refs[r]) for r in dropped]
        workers = group.world_size - len(dropped)
        self.coord.metrics.event(step, "shrunk", dropped=dropped, killed=killed, unit=unit, workers=workers)
        log.warning("shrinking to %d workers: ranks %s dropped (whole units of %d ranks; live members killed: %s)",
                    workers, dropped, unit, killed or "none")

    def _sync_state(self, steps: dict[int, int], clean: set[int] | None = None) -> str:
        """Bring every member to the most advanced live state; returns where it came from. A strategy
        whose failed step may leave state half-updated copies only from `clean` ranks (those whose
        last round succeeded), and only where its layout has seed classes; else the checkpoint."""
        coord, group = self.coord, self.coord.group
        layout = coord.layout()
        if coord.spec.worker_cls.failed_step_keeps_state:
            plan = peer_plan(layout, steps)
        else:
            plan = peer_plan(layout, steps, clean) if layout.seeds is not None and clean is not None else None
        if plan is not None:
            src_step, sources = plan
            timeout = coord.cfg.cluster.round_timeout_s
            states = {src: ray.put(ray.get(group.actors[src].state_dict.remote(replica=True),
                                           timeout=timeout)["replica"])
                      for src in sorted(set(sources.values()))}
            refs = []
            for r, src in sources.items():
                refs += [group.actors[r].load_state_dict.remote(states[src]), group.actors[r].set_step.remote(src_step)]
            ray.get(refs, timeout=timeout)
            coord.step = src_step
            seeded = any(layout.state_keys[r] != layout.state_keys[src] for r, src in sources.items())
            kind = "peer replica" if seeded else "peer"
            return f"{kind} (rank {min(sources.values())})" if len(states) == 1 else \
                f"{kind}s (ranks {', '.join(map(str, sorted(states)))})" if states else "live state"
        if coord.restore_checkpoint():
            return "checkpoint"
        raise RecoveryError("no live peer holds the state and there is no checkpoint to recover from")

    # -- the two entry points ---------------------------------------------------------
    def recover(self, failure: WorkerFailure, step: int, detection_s: float) -> None:
        coord, group = self.coord, self.coord.group
        t0 = time.monotonic()
        coord.metrics.event(step, "fault_detected", dead=sorted(failure.dead), hung=sorted(failure.hung),
                            errored=sorted(failure.errored), detection_s=detection_s)
        log.warning("step %d failed (%s); recovering", step, failure)
        lost = failure.dead | failure.hung
        group.kill(lost)
        alive = {r: s for r, s in group.probe().items() if r not in lost}
        lost |= set(range(group.world_size)) - set(alive)
        group.kill(lost)
        old_ranks = [r for r in range(group.world_size) if r not in lost]
        actors, addresses = self._replace(lost, step)
        # members keep their order; a surviving worker's applied step follows it to its new rank
        kept = {id(group.actors[r]): alive[r] for r in old_ranks}
        tainted = {id(group.actors[r]) for r in failure.errored}  # its step failed: its state may be half-updated
        members = {id(a) for a in actors}  # a step that stands is logged from its members' results only
        failure.results = {r: v for r, v in failure.results.items()
                           if 0 <= r < len(group.actors) and id(group.actors[r]) in members}
        group.set_members(actors, addresses)
        group.form_group()
        steps = {r: kept[id(a)] for r, a in enumerate(actors) if id(a) in kept}
        source = self._sync_state(steps, {r for r, a in enumerate(actors) if id(a) in kept and id(a) not in tainted})
        self._resized()
        recovery_s = time.monotonic() - t0
        lost_steps = max(0, step - 1 - coord.step)
        coord.metrics.event(step, "recovered", source=source, workers=group.world_size, recovery_s=recovery_s,
                            steps_lost=lost_steps, resume_step=coord.step + 1)
        coord.metrics.log(step, {"faults/events": 1, "faults/recovery_s": recovery_s,
                                 "faults/detection_s": detection_s, "faults/steps_lost": lost_steps,
                                 "faults/workers": group.world_size})
        log.warning("recovered from %s in %.2fs with %d workers; continuing at step %d",
                    source, recovery_s, group.world_size, coord.step + 1)

    def maybe_grow(self, step: int) -> None:
        """Grow back: pending replacements that came up join at this step boundary (seeded from live
        peers: ranks of the same key, or with `Layout.seeds` of the same class, e.g. a rejoining
        DiLoCo replica starts as a copy of a live one)."""
        if not self.pending or not (self.coord.spec.worker_cls.failed_step_keeps_state or
                                    self.coord.layout().seeds is not None):
            return
        ready_refs = {ref for ref in ray.wait([r for _, r in self.pending], num_returns=len(self.pending),
                                              timeout=0)[0]}
        joining = [(a, ref) for a, ref in self.pending if ref in ready_refs]
        if not joining:
            return
        coord, group = self.coord, self.coord.group
        joining = joining[:joinable(len(joining), coord.cfg.cluster.num_workers - group.world_size,
                                    coord.layout().unit)]
        if not joining:
            return
        grown = coord.spec.worker_cls.layout(coord.cfg.strategy, group.world_size + len(joining))
        live = {r: coord.step for r in range(group.world_size)}  # at a step boundary: all clean
        if peer_plan(grown, live, set(live)) is None:
            return  # a joining rank would hold state no live rank has: they stay pending (abandon() reaps them)
        t0 = time.monotonic()
        joined = {id(a) for a, _ in joining}
        self.pending = [p for p in self.pending if id(p[0]) not in joined]
        group.set_members(group.actors + [a for a, _ in joining],
                          group.addresses + [ray.get(ref) for _, ref in joining])
        group.form_group()
        self._sync_state(live, set(live))
        self._resized()
        coord.metrics.event(step, "grown", workers=group.world_size, seconds=time.monotonic() - t0)
        log.info("grew back to %d workers at step %d", group.world_size, step)

    def _resized(self) -> None:
        coord = self.coord
        coord.samples = coord.samples_at[coord.step]
        coord.driver.world_size = coord.group.world_size
        coord.outliers.reset()

    def abandon(self) -> None:
        for actor, _ in self.pending:
            ray.kill(actor, no_restart=True)
        self.pending = []


def surviving_units(world_size: int, missing: set[int], unit: int) -> list[int]:
    """The ranks kept after a fault, in rank order: those of every unit of `unit` consecutive ranks
    (ranks u*unit .. u*unit+unit-1) with no rank in `missing`; a unit with a missing rank is dropped whole."""
    assert unit >= 1 and world_size % unit == 0, (world_size, unit)
    return [r for r in range(world_size) if not any(m // unit == r // unit for m in missing)]


def joinable(ready: int, room: int, unit: int) -> int:
    """How many of `ready` pending workers may join a world with `room` free places: whole units only."""
    return max(0, min(ready, room)) // unit * unit


def peer_plan(layout: Layout, steps: dict[int, int],
              clean: set[int] | None = None) -> tuple[int, dict[int, int]] | None:
    """(step, {rank: source rank}) that brings every rank of `layout` to one step by copying from
    live holders of its state key, or None when some key has no live holder at a common step.
    `steps`: {live rank: last applied step}. The most advanced common step wins; the lowest
    holder is the source; ranks already at that step are not copied. `clean`: the ranks whose
    state may be copied (default: every live one); any other rank is copied to. With
    `layout.seeds`, a key that no clean rank holds at the step is copied from the lowest clean
    holder of a key of the same seed class (a lost replica from a live peer replica)."""
    keys, seeds = layout.state_keys, layout.seeds
    ok = {r for r in steps if r < len(keys) and (clean is None or r in clean)}
    for step in sorted({steps[r] for r in ok}, reverse=True):
        holder: dict[str, int] = {}
        seeder: dict[str, int] = {}
        for r in sorted(ok):
            if steps[r] == step:
                holder.setdefault(keys[r], r)
                if seeds is not None:
                    seeder.setdefault(seeds[r], r)
        source = {r: holder.get(key, seeder.get(seeds[r]) if seeds is not None else None)
                  for r, key in enumerate(keys)}
        if all(s is not None for s in source.values()):
            return step, {r: s for r, s in source.items() if r not in ok or steps[r] != step}
    return None
