"""Run real TrainWorkers (no Ray) on spawned processes for a few steps; always reap them.

`train_ranks(cfg, steps)` starts cluster.num_workers processes, each a `TrainWorker(cfg, rank)` that
joins generation 0 of a store hosted here (its named groups included), takes `steps` steps over
the global batch, and returns {"losses", "params" (the first evaluation view's flat parameters),
"metrics" (the last step's), "steps" (every step's metrics), "eval" (`TrainWorker.evaluate`)} per rank. `regen_at`: after that many steps every rank joins
generation 1 (the groups re-formed in the same processes, as after a fault) and goes on.
"""

from __future__ import annotations

import traceback
from typing import Any

from benchmarks._spawn import spawn_ranks
from raylane.comm.process_group import host_store


def _entry(cfg: Any, rank: int, port: int, steps: int, regen_at: int | None, out: Any) -> None:
    try:
        from raylane.workers.optim import lr_at
        from raylane.workers.worker import TrainWorker

        world, bs = cfg.cluster.num_workers, cfg.data.batch_size
        worker = TrainWorker(cfg, rank)
        worker.connect("127.0.0.1", port, 0, rank, world, "gloo", 60.0)
        losses, metrics, steps_metrics = [], {}, []
        for step in range(1, steps + 1):
            if step - 1 == regen_at:
                worker.connect("127.0.0.1", port, 1, rank, world, "gloo", 60.0)
            metrics = worker.train_step((step - 1) * world * bs, lr_at(step, cfg.train.steps, cfg.optim))
            losses.append(metrics["loss"])
            steps_metrics.append(metrics)
        if hasattr(worker.strategy, "finish_syncs"):
            worker.strategy.finish_syncs()
        evaluation = worker.evaluate(world)
        out.put((rank, "ok", {"losses": losses, "params": worker.flat_parameters().numpy(), "metrics": metrics,
                              "steps": steps_metrics, "eval": evaluation}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))


def train_ranks(cfg: Any, steps: int, regen_at: int | None = None, timeout_s: float = 120.0) -> list[dict]:
    world = cfg.cluster.num_workers
    store = host_store("127.0.0.1", timeout_s)
    try:
        return spawn_ranks(_entry, [(cfg, r, store.port, steps, regen_at) for r in range(world)], timeout_s)
    finally:
        del store
