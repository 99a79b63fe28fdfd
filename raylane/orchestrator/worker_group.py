"""WorkerGroup: starts, calls and stops the TrainWorker actors, and forms their process group.

The run's TCPStore lives here, in the driver, never in a worker, so any worker may die.
`form_group()` starts a new generation: every live worker joins a fresh group under the
prefix `gen<n>` of that store, inside its existing process. Every wait is bounded
(`cluster.start_timeout_s`), so a worker that never comes up is reported, not waited on.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from raylane.comm import host_store
from raylane.workers.worker import TrainWorker

log = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """Workers did not come up in time (not enough resources, or they crashed at start)."""


class WorkerGroup:
    def __init__(self, cfg: Any, loopback: bool):
        self.cfg = cfg
        self.world_size = cfg.cluster.num_workers
        self.loopback = loopback
        self.generation = -1
        self.actors: list[Any] = []
        self.store_host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        self.store = host_store(self.store_host, cfg.cluster.start_timeout_s)
        self.addresses: list[dict[str, Any]] = []

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        c = self.cfg.cluster
        actor_cls = ray.remote(TrainWorker)
        threads = max(1, int(c.cpus_per_worker))
        self.actors = [actor_cls.options(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
                                         max_restarts=0, name=None).remote(self.cfg, r, threads)
                       for r in range(self.world_size)]
        try:
            self.addresses = self.get([a.address.remote() for a in self.actors], timeout=c.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise WorkerStartError(
                f"cluster.num_workers={c.num_workers}: workers were not up after cluster.start_timeout_s="
                f"{c.start_timeout_s}s; the cluster has {ray.cluster_resources()}") from None
        self.form_group()

    def form_group(self) -> None:
        """Every worker joins a new group generation; blocks until all have."""
        self.generation += 1
        c = self.cfg.cluster
        refs = [a.connect.remote(self.store_host, self.store.port, self.generation, r, self.world_size,
                                 c.resolved_backend(), c.collective_timeout_s,
                                 None, None if self.loopback else self.addresses[r]["ip"])
                for r, a in enumerate(self.actors)]
        self.get(refs, timeout=c.start_timeout_s)
        log.info("process group generation %d formed with %d workers", self.generation, self.world_size)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    # -- calls ------------------------------------------------------------------------
    def call(self, method: str, *args: Any, ranks: list[int] | None = None, **kwargs: Any) -> list:
        """Start `method` on the given ranks (default all); returns ObjectRefs in rank order.

        TrainWorker's own methods are called directly; anything else is a method of the
        strategy's worker half.
        """
        targets = [self.actors[r] for r in (range(self.world_size) if ranks is None else ranks)]
        if hasattr(TrainWorker, method):
            return [getattr(a, method).remote(*args, **kwargs) for a in targets]
        return [a.call.remote(method, *args, **kwargs) for a in targets]

    def get(self, refs: list, timeout: float | None = None) -> list:
        return ray.get(refs, timeout=timeout)
