"""Recovery in place: replace what failed, re-form the group, bring state from a live peer.

`recover(failure, step)` after a failed round:
1. kill the dead and hung workers (and any that miss the heartbeat);
2. start a replacement for each at its rank; one not up within `cluster.replace_timeout_s`
   is dropped (elastic shrink, if `cluster.min_workers` allows) and kept pending to grow
   back when capacity returns (`maybe_grow`, at a step boundary);
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
    def _replace(self, lost: set[int]) -> tuple[list[Any], list[dict]]:
        group, c = self.coord.group, self.coord.cfg.cluster
        fresh = {r: group.new_actor(r) for r in sorted(lost)}
        refs = {r: a.address.remote() for r, a in fresh.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=c.replace_timeout_s)
        actors, addresses = [], []
        for r in range(group.world_size):
            if r not in lost:
                actors.append(group.actors[r])
                addresses.append(group.addresses[r])
            elif refs[r] in ready:
                actors.append(fresh[r])
                addresses.append(ray.get(refs[r]))
            else:
                self.pending.append((fresh[r], refs[r]))
        if len(actors) < group.world_size and not self.coord.layout().elastic:
            raise RecoveryError(f"only {len(actors)} of {group.world_size} workers after a fault, and strategy "
                                f"{self.coord.cfg.strategy.name!r} cannot continue with fewer: add capacity "
                                f"or raise cluster.replace_timeout_s")
        if len(actors) < c.floor:
            raise RecoveryError(f"only {len(actors)} workers after a fault; cluster.min_workers={c.floor}: "
                                f"lower it to continue with fewer, or add capacity")
        return actors, addresses

    def _sync_state(self, steps: dict[int, int]) -> str:
        """Bring every member to the most advanced live state; returns where it came from."""
        coord, group = self.coord, self.coord.group
        plan = peer_plan(coord.layout(), steps) if coord.spec.worker_cls.failed_step_keeps_state else None
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
            return f"peer (rank {min(sources.values())})" if len(states) == 1 else \
                f"peers (ranks {', '.join(map(str, sorted(states)))})" if states else "live state"
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
        actors, addresses = self._replace(lost)
        # members keep their order; a surviving worker's applied step follows it to its new rank
        kept = {id(group.actors[r]): alive[r] for r in old_ranks}
        group.set_members(actors, addresses)
        group.form_group()
        steps = {r: kept[id(a)] for r, a in enumerate(actors) if id(a) in kept}
        source = self._sync_state(steps)
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
        """Grow back: pending replacements that came up join at this step boundary."""
        if not self.pending or not self.coord.spec.worker_cls.failed_step_keeps_state:
            return
        ready_refs = {ref for ref in ray.wait([r for _, r in self.pending], num_returns=len(self.pending),
                                              timeout=0)[0]}
        joining = [(a, ref) for a, ref in self.pending if ref in ready_refs]
        if not joining:
            return
        coord, group = self.coord, self.coord.group
        joining = joining[:coord.cfg.cluster.num_workers - group.world_size]
        if not joining:
            return
        grown = coord.spec.worker_cls.layout(coord.cfg.strategy, group.world_size + len(joining))
        if peer_plan(grown, {r: coord.step for r in range(group.world_size)}) is None:
            return  # a joining rank would hold state no live rank has: they stay pending (abandon() reaps them)
        t0 = time.monotonic()
        joined = {id(a) for a, _ in joining}
        self.pending = [p for p in self.pending if id(p[0]) not in joined]
        group.set_members(group.actors + [a for a, _ in joining],
                          group.addresses + [ray.get(ref) for _, ref in joining])
        group.form_group()
        self._sync_state({r: coord.step for r in range(group.world_size - len(joining))})
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


def peer_plan(layout: Layout, steps: dict[int, int]) -> tuple[int, dict[int, int]] | None:
    """(step, {rank: source rank}) that brings every rank of `layout` to one step by copying from
    live holders of its state key, or None when some key has no live holder at a common step.
    `steps`: {live rank: last applied step}. The most advanced common step wins; the lowest
    holder is the source; ranks already at that step are not copied."""
    keys = layout.state_keys
    for step in sorted(set(steps.values()), reverse=True):
        source: dict[str, int] = {}
        for r in sorted(steps):
            if steps[r] == step and r < len(keys):
                source.setdefault(keys[r], r)
        if all(key in source for key in keys):
            return step, {r: source[key] for r, key in enumerate(keys) if steps.get(r) != step}
    return None
