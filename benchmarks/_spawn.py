"""Run one target per rank in spawned processes and collect what each puts on its queue; always reap.

`spawn_ranks(target, args_per_rank, timeout_s)` starts `target(*args, out)` for each rank's args,
where the target puts `(rank, "ok", value)` or `(rank, "error", traceback)` on `out`; it returns the
values in rank order, or raises `error` naming the ranks that failed, died or timed out. The
benchmarks' process harnesses and tests/multiproc.py use it.

Fresh processes by default (a benchmark measures a process's memory from its start). With `REUSE`
(the test suite turns it on in tests/conftest.py) the processes stay warm between calls: a spawned
Python that has imported torch costs seconds of CPU, and the suite makes hundreds of such calls.
A warm process runs each target with the settings it started with (torch's threads and default
seed, the comm kernels' and pipeline's switches) restored; processes that ran DeepSpeed are kept
apart from the others (`pool="deepspeed"`); after any failure or timeout the pool is killed and the
next call starts fresh ones.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any, Callable, Sequence

REUSE = False


def _serve(inbox: Any, out: Any) -> None:
    """A warm rank: run each (target, args) sent to it, with the settings it started with."""
    import torch

    from raylane.comm import kernels, pipeline

    threads, seed = torch.get_num_threads(), torch.initial_seed()
    k0, p0 = kernels.configure(), pipeline.configure()
    while True:
        job = inbox.get()
        if job is None:
            return
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        kernels.configure(**k0)
        pipeline.configure(**p0)
        target, args = job
        target(*args, out)


class _Warm:
    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.inboxes: list[Any] = []
        self.out: Any = None

    def reset(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(timeout=5)
        self.procs, self.inboxes, self.out = [], [], None

    def run(self, target: Callable[..., None], args_per_rank: Sequence[tuple], timeout_s: float,
            error: type[Exception]) -> list[Any]:
        world = len(args_per_rank)
        if any(not p.is_alive() for p in self.procs):
            self.reset()
        if self.out is None:
            self.out = self.ctx.Queue()
        while len(self.procs) < world:
            inbox = self.ctx.Queue()
            p = self.ctx.Process(target=_serve, args=(inbox, self.out), daemon=True)
            p.start()
            self.procs.append(p)
            self.inboxes.append(inbox)
        for inbox, args in zip(self.inboxes, args_per_rank):
            inbox.put((target, args))
        try:
            return _collect(self.out, self.procs[:world], timeout_s, error)
        except BaseException:
            self.reset()  # ranks may be stuck in a collective or hold a late answer
            raise


_POOLS: dict[str, _Warm] = {}


def _collect(out: Any, procs: list[Any], timeout_s: float, error: type[Exception]) -> list[Any]:
    world = len(procs)
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world:
        try:
            rank, status, value = out.get(timeout=0.5)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead or time.monotonic() > deadline:
                raise error(f"ranks {dead or 'all'} died or timed out; got {sorted(results)}")
            continue
        if status == "error":
            raise error(f"rank {rank} failed:\n{value}")
        results[rank] = value
    return [results[r] for r in range(world)]


def spawn_ranks(target: Callable[..., None], args_per_rank: Sequence[tuple], timeout_s: float,
                error: type[Exception] = AssertionError, pool: str = "plain") -> list[Any]:
    if REUSE:
        return _POOLS.setdefault(pool, _Warm()).run(target, args_per_rank, timeout_s, error)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out), daemon=True) for args in args_per_rank]
    for p in procs:
        p.start()
    try:
        return _collect(out, procs, timeout_s, error)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
