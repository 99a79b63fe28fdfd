"""Run one target per rank in spawned processes and collect what each puts on its queue; always reap.

`spawn_ranks(target, args_per_rank, timeout_s)` starts `target(*args, out)` for each rank's args,
where the target puts `(rank, "ok", value)` or `(rank, "error", traceback)` on `out`; it returns the
values in rank order, or raises `error` naming the ranks that failed, died or timed out. The
benchmarks' process harnesses and tests/multiproc.py use it.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any, Callable, Sequence


def spawn_ranks(target: Callable[..., None], args_per_rank: Sequence[tuple], timeout_s: float,
                error: type[Exception] = AssertionError) -> list[Any]:
    world = len(args_per_rank)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out), daemon=True) for args in args_per_rank]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
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
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]
