"""Run a full-graph GNN strategy's real workers (TrainWorker, no Ray) as W spawned processes.

`run_workers(cfg, epochs)` starts one process per rank, each a `raylane.workers.worker.TrainWorker`
joined to a Gloo group (and the strategy's named groups) through a TCPStore hosted here, runs
`epochs` train steps (one per epoch) and an evaluation, and returns per rank: the step results,
the first epoch's gradients, the evaluation, the wall time of each epoch (after a barrier) and the
Communicator's byte counters; with `eval_every` also an evaluation every that many epochs
(`evals`: (epoch, evaluation), outside the timed epochs; its bytes are not training bytes), and the
process's memory: `rss_setup_bytes` (resident after building the worker) and `peak_rss_bytes`
(the process's peak resident set, ru_maxrss). The driver half's `summarise` is applied as the coordinator would.
Processes are always reaped; a rank that fails or runs past `timeout_s` fails the call.
Used by benchmarks/gnn.py and tests/test_gnn_strategies.py.
"""

from __future__ import annotations

import pickle
import resource
import time
import traceback
from typing import Any

from benchmarks._spawn import spawn_ranks


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _entry(cfg: Any, rank: int, world: int, port: int, epochs: int, lr: float, threads: int, eval_every: int,
           out: Any) -> None:
    try:
        import torch

        from raylane.workers.worker import TrainWorker

        w = TrainWorker(cfg, rank, threads)
        w.connect("127.0.0.1", port, 0, rank, world, "gloo", cfg.cluster.collective_timeout_s)
        rss_setup = _rss_bytes()
        steps, grads, times, evals = [], None, [], []
        for e in range(epochs):
            w.comm.barrier()
            t0 = time.perf_counter()
            steps.append(w.train_step(e, lr))
            w.comm.barrier()
            times.append(time.perf_counter() - t0)
            if e == 0:
                grads = {n: p.grad.detach().clone() for n, p in w.model.named_parameters() if p.grad is not None}
            if eval_every and (e + 1) % eval_every == 0 and e + 1 < epochs:
                evals.append((e + 1, w.evaluate(world)))
        ev = w.evaluate(world)
        evals.append((epochs, ev))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # plain pickle: tensors travel inline (the queue's own pickler would share them through this process)
        out.put((rank, "ok", pickle.dumps({"steps": steps, "grads": grads, "eval": ev, "epoch_s": times,
                                           "part": w.part, "comm": w.comm.stats.as_dict(),
                                           "evals": evals, "rss_setup_bytes": rss_setup,
                                           "peak_rss_bytes": peak})))
        del torch
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))


def run_workers(cfg: Any, epochs: int, lr: float = 0.01, threads: int = 1, timeout_s: float = 120.0,
                eval_every: int = 0) -> list[dict]:
    from raylane.comm import host_store
    from raylane.strategies import get

    world = cfg.cluster.num_workers
    store = host_store("127.0.0.1", timeout_s)
    try:
        values = spawn_ranks(_entry, [(cfg, r, world, store.port, epochs, lr, threads, eval_every)
                                      for r in range(world)],
                             timeout_s, error=RuntimeError)
    finally:
        del store
    ranks = [pickle.loads(v) for v in values]
    driver = get(cfg.strategy.name).driver_cls(cfg.strategy, world)
    for e in range(epochs):  # what the coordinator's round would log
        step = [r["steps"][e] for r in ranks]
        total = sum(s.pop("loss_part") for s in step)
        for s in step:
            s["loss"] = total
        driver.summarise(step)
    return ranks
