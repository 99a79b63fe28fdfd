"""Run real TrainWorkers (no Ray) on spawned processes for a few steps; always reap them.

`train_ranks(cfg, steps)` starts cluster.num_workers processes, each a `TrainWorker(cfg, rank)` that
joins generation 0 of a store hosted here (its named groups included), takes `steps` steps over
the global batch, and returns {"losses", "params" (the first evaluation view's flat parameters),
"metrics" (the last step's), "steps" (every step's metrics), "eval" (`TrainWorker.evaluate`),
"wire" (per step: bytes this process wrote (/proc/self/io wchar: sockets, as benchmarks/comm.py
measures) and Gloo messages sent and received as counted), "state_bytes" (the serialized replica state
a checkpoint part or a peer transfer holds), "peak_growth_bytes" (the growth of the process's peak RSS
from just before the model is built, DeepSpeed already imported: what building and training added)}
per rank. `regen_at`: after that many steps every rank joins
generation 1 (the groups re-formed in the same processes, as after a fault) and goes on.
"""

from __future__ import annotations

import io
import traceback
from typing import Any

import torch

from benchmarks._spawn import spawn_ranks
from raylane.comm.process_group import host_store


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _messages(worker: Any) -> tuple[int, int]:
    totals = [c.stats.total() for c in [worker.comm, *worker.comms.values()]]
    return sum(t.messages_sent for t in totals), sum(t.messages_recv for t in totals)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _uses_deepspeed(cfg: Any) -> bool:
    return getattr(cfg.strategy, "engine", None) == "deepspeed"


def _entry(cfg: Any, rank: int, port: int, steps: int, regen_at: int | None, out: Any) -> None:
    try:
        from raylane.workers.optim import lr_at
        from raylane.workers.worker import TrainWorker

        world, bs = cfg.cluster.num_workers, cfg.data.batch_size
        if _uses_deepspeed(cfg):
            from raylane.strategies.replicas.deepspeed import _import_deepspeed

            _import_deepspeed(torch.device("cpu"))
        with open("/proc/self/clear_refs", "w") as f:  # the peak RSS from here on
            f.write("5")
        rss0 = _status_kb("VmRSS:")
        worker = TrainWorker(cfg, rank)
        worker.connect("127.0.0.1", port, 0, rank, world, "gloo", 60.0)
        losses, metrics, steps_metrics, wire = [], {}, [], []
        for step in range(1, steps + 1):
            if step - 1 == regen_at:
                worker.connect("127.0.0.1", port, 1, rank, world, "gloo", 60.0)
            w0, m0 = _wchar(), _messages(worker)
            metrics = worker.train_step((step - 1) * world * bs, lr_at(step, cfg.train.steps, cfg.optim))
            m1 = _messages(worker)
            wire.append((_wchar() - w0, m1[0] - m0[0], m1[1] - m0[1]))
            losses.append(metrics["loss"])
            steps_metrics.append(metrics)
        peak_kb = _status_kb("VmHWM:")  # training's, before evaluation gathers a whole ZeRO-3 model
        if hasattr(worker.strategy, "finish_syncs"):
            worker.strategy.finish_syncs()
        evaluation = worker.evaluate(world)
        buf = io.BytesIO()
        torch.save(worker.state_dict()["replica"], buf)
        out.put((rank, "ok", {"losses": losses, "params": worker.flat_parameters().numpy(), "metrics": metrics,
                              "steps": steps_metrics, "eval": evaluation, "wire": wire,
                              "state_bytes": buf.tell(), "peak_growth_bytes": 1024 * (peak_kb - rss0)}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))


def train_ranks(cfg: Any, steps: int, regen_at: int | None = None, timeout_s: float = 120.0) -> list[dict]:
    world = cfg.cluster.num_workers
    store = host_store("127.0.0.1", timeout_s)
    try:
        return spawn_ranks(_entry, [(cfg, r, store.port, steps, regen_at) for r in range(world)], timeout_s,
                           pool="deepspeed" if _uses_deepspeed(cfg) else "plain")  # kept apart from plain ranks
    finally:
        del store
