"""WorkerGroup: starts, calls, replaces and stops the TrainWorker actors; forms their process group.

The run's TCPStore lives here, in the driver, never in a worker, so any worker may die.
`form_group()` starts a new generation: every member joins a fresh group under the prefix
`gen<n>` of that store, inside its existing process. Every wait is bounded: `get()`
classifies what did not come back — dead (the actor died), errored (its collective
failed because a peer died or timed out), hung (no answer by the round deadline) — and
raises `WorkerFailure` for the coordinator to recover from.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from raylane.comm import Link, host_store
from raylane.workers.chaos import Directive
from raylane.workers.worker import TrainWorker

log = logging.getLogger(__name__)

GRACE_S = 3.0  # after the first failure of a round, how long the others get to answer
SETTLE_S = 0.5  # peers timed out waiting on the silent ones: wait this long for more errors, then decide
STATUS_AFTER_S = 2.0  # a round silent this long: say in the progress bar whom it waits on


class WorkerStartError(RuntimeError):
    """Workers did not come up in time (not enough resources, or they crashed at start)."""


@dataclass
class WorkerFailure(Exception):
    dead: set[int] = field(default_factory=set)
    errored: set[int] = field(default_factory=set)
    hung: set[int] = field(default_factory=set)
    detected_at: float = field(default_factory=time.monotonic)
    errors: dict[int, str] = field(default_factory=dict)  # rank -> last line of what it raised
    results: dict[int, Any] = field(default_factory=dict)  # rank -> what the ranks that succeeded returned

    def __str__(self) -> str:
        return f"dead={sorted(self.dead)} hung={sorted(self.hung)} errored={sorted(self.errored)}"


_SOURCE = re.compile(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")  # Gloo's "[/…/pair.cc:553] "


def short_error(text: str, limit: int = 200) -> str:
    """A worker's error in one line: its last line, without C++ source locations, its first sentence when
    that says it all (Gloo's "Connection closed by peer [addr]: a peer died" and its chatty tail), cut at a
    word."""
    lines = text.strip().splitlines() or [""]
    line = _SOURCE.sub("", lines[-1]).strip()
    if "Connection closed by peer" in line or "Connection reset by peer" in line:
        line = line.split(". ")[0] + " (a peer process died or left the group)"
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def _silent_ones_are_hung(results: dict, failure: WorkerFailure) -> bool:
    """Every worker that answered failed, and some timed out in a collective: the ones still
    silent are what they waited for, so they are hung now (not GRACE_S later)."""
    return (not results and not failure.dead and bool(failure.errored)
            and any("timed out" in e.lower() for e in failure.errors.values()))


class _Pool:
    """Idle warm TrainWorker actors of this driver, by (Ray job, CPUs, GPUs): at most one finished run's
    worth, since idle actors hold their CPUs. Taking from one key kills the others (their resources
    may be what the new run needs)."""

    def __init__(self) -> None:
        self.idle: dict[tuple, list[Any]] = {}

    def take(self, key: tuple, n: int) -> list[Any]:
        mine = self.idle.pop(key, [])
        self.clear()
        for a in mine[n:]:
            ray.kill(a, no_restart=True)
        return mine[:n]

    def put(self, key: tuple, actors: list[Any]) -> None:
        self.clear()
        if actors:
            self.idle[key] = actors

    def clear(self) -> list[Any]:
        for actors in self.idle.values():
            for a in actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - Ray shut down already: the actor is gone
                    pass
        self.idle = {}
        return []


_POOL = _Pool()


class WorkerGroup:
    on_wait: Any = None  # on_wait(text): what a get() is waiting on ("" when done); the bar shows it

    def __init__(self, cfg: Any, loopback: bool):
        self.cfg = cfg
        self.loopback = loopback
        self.generation = -1
        self.actors: list[Any] = []
        self.addresses: list[dict[str, Any]] = []
        self.links: dict[int, Link] = {}
        self.store_host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        self.store = host_store(self.store_host, cfg.cluster.start_timeout_s)
        self._step, self._directives = 0, {}
        self._ref_rank: dict[Any, int] = {}
        self._starting: list = []  # launch()'s refs, until wait_started()

    @property
    def world_size(self) -> int:
        return len(self.actors)

    # -- lifecycle --------------------------------------------------------------------
    def new_actor(self, rank: int) -> Any:
        c = self.cfg.cluster
        return ray.remote(TrainWorker).options(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
                                               max_restarts=0).remote(self.cfg, rank, max(1, int(c.cpus_per_worker)))

    def _kind(self) -> str:
        """What a worker of this run leaves in its process (TrainWorker.park): DeepSpeed or nothing."""
        return "deepspeed" if getattr(self.cfg.strategy, "engine", None) == "deepspeed" else "plain"

    def _pool_key(self) -> tuple:
        c = self.cfg.cluster
        return ray.get_runtime_context().get_job_id(), c.cpus_per_worker, c.gpus_per_worker, self._kind()

    def start(self) -> None:
        self.launch()
        self.wait_started()

    def launch(self) -> None:
        """Ask for the members (warm ones from the pool, rebuilt; new actors) without waiting for them:
        the driver does its own set-up meanwhile, then `wait_started()`."""
        c = self.cfg.cluster
        warm = _POOL.take(self._pool_key(), c.num_workers) if c.reuse_workers else _POOL.clear()
        threads = max(1, int(c.cpus_per_worker))
        self.actors = warm + [self.new_actor(r) for r in range(len(warm), c.num_workers)]
        self._starting = ([a.reinit.remote(self.cfg, r, threads) for r, a in enumerate(warm)]
                          + [a.address.remote() for a in self.actors[len(warm):]])

    def wait_started(self) -> None:
        """Every member up (bounded by cluster.start_timeout_s), then the first group generation."""
        c = self.cfg.cluster
        try:
            self.addresses = ray.get(self._starting, timeout=c.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise WorkerStartError(
                f"cluster.num_workers={c.num_workers}: workers were not up after cluster.start_timeout_s="
                f"{c.start_timeout_s}s; the cluster has {ray.cluster_resources()}") from None
        self.form_group()

    def form_group(self) -> None:
        """Every member joins a new group generation; blocks (bounded) until all have."""
        self.generation += 1
        c = self.cfg.cluster
        refs = [a.connect.remote(self.store_host, self.store.port, self.generation, r, self.world_size,
                                 c.resolved_backend(), c.collective_timeout_s, self.links.get(r),
                                 None if self.loopback else self.addresses[r]["ip"])
                for r, a in enumerate(self.actors)]
        ray.get(refs, timeout=c.start_timeout_s)
        log.info("process group generation %d formed with %d workers", self.generation, self.world_size)

    def set_members(self, actors: list[Any], addresses: list[dict[str, Any]]) -> None:
        self.actors, self.addresses = list(actors), list(addresses)

    def kill(self, ranks: set[int]) -> None:
        for r in ranks:
            ray.kill(self.actors[r], no_restart=True)

    def shutdown(self) -> None:
        """Stop the members; with cluster.reuse_workers, the healthy ones (answering within 10 s; after
        DeepSpeed, for DeepSpeed runs only) wait in this driver's pool for its next run instead."""
        actors, self.actors = self.actors, []
        if not actors:
            return
        if self.cfg.cluster.reuse_workers and ray.is_initialized():
            refs = {a.park.remote(): a for a in actors}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=10.0)
            healthy = []
            for ref in ready:
                try:
                    if ray.get(ref) == self._kind():
                        healthy.append(refs[ref])
                except Exception:  # noqa: BLE001 - a dead or failing actor is simply not reused
                    pass
            _POOL.put(self._pool_key(), [a for a in actors if a in healthy])
            actors = [a for a in actors if a not in healthy]
        for a in actors:
            ray.kill(a, no_restart=True)

    def probe(self, timeout_s: float = 5.0) -> dict[int, int]:
        """Heartbeat: {rank: last applied step} of the members that answer within `timeout_s`."""
        refs = {a.ping.remote(): r for r, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        alive = {}
        for ref in ready:
            try:
                alive[refs[ref]] = ray.get(ref)[1]
            except ray.exceptions.RayError:
                pass
        return alive

    def _report_wait(self, pending: list, start: float, deadline: float, failure: WorkerFailure) -> None:
        silent = time.monotonic() - start
        if self.on_wait is None or not pending or silent < STATUS_AFTER_S:
            return
        ranks = ", ".join(str(self._ref_rank.get(ref, "?")) for ref in pending)
        broken = f" ({len(failure.dead | failure.errored)} failed)" if failure.dead or failure.errored else ""
        self.on_wait(f"waiting on worker {ranks}: silent {silent:.0f} s of {deadline - start:.0f} s{broken}")

    # -- calls ------------------------------------------------------------------------
    def begin_step(self, step: int, directives: dict[int, Directive]) -> None:
        """Calls from now on belong to `step`; each rank's directive goes with its first call."""
        self._step, self._directives = step, dict(directives)

    def call(self, method: str, *args: Any, ranks: list[int] | None = None, **kwargs: Any) -> list:
        """Start `method` on the given ranks (default all); ObjectRefs in rank order.

        TrainWorker's own methods run on it; anything else on the strategy's worker half.
        """
        refs = []
        for r in range(self.world_size) if ranks is None else ranks:
            ref = self.actors[r].run.remote(self._directives.pop(r, None), self._step, method, *args, **kwargs)
            self._ref_rank[ref] = r
            refs.append(ref)
        return refs

    def get(self, refs: list, timeout: float | None = None) -> list:
        """Results in order, or WorkerFailure naming who died, who errored and who hung."""
        start = time.monotonic()
        deadline = start + (timeout or self.cfg.cluster.round_timeout_s)
        pending, results, failure = list(refs), {}, WorkerFailure()
        last_error = start
        while pending and time.monotonic() < deadline:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, min(SETTLE_S, deadline - time.monotonic())))
            self._report_wait(pending, start, deadline, failure)
            for ref in ready:
                rank = self._ref_rank.get(ref, -1)
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    failure.dead.add(rank)
                except ray.exceptions.RayError as e:
                    failure.errors[rank], last_error = short_error(str(e)), time.monotonic()
                    log.warning("worker %d failed: %s", rank, failure.errors[rank])
                    failure.errored.add(rank)
                if (failure.dead or failure.errored) and pending:
                    # the others get until their own collective timed out (counted from the round's
                    # start: a peer that errored on a timeout already waited that long), at least GRACE_S
                    own = start + self.cfg.cluster.collective_timeout_s + GRACE_S
                    deadline = min(deadline, max(own, time.monotonic() + GRACE_S))
            if pending and _silent_ones_are_hung(results, failure) and time.monotonic() - last_error >= SETTLE_S:
                break
        if self.on_wait is not None:
            self.on_wait("")
        failure.hung = {self._ref_rank.get(ref, -1) for ref in pending}
        failure.results = {self._ref_rank.get(ref, -1): res for ref, res in results.items()}
        for ref in refs:
            self._ref_rank.pop(ref, None)
        if failure.dead or failure.errored or failure.hung:
            raise failure
        return [results[ref] for ref in refs]
