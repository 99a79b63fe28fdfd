"""Run a function on W spawned processes joined by a Gloo group; always reap them.

`run_ranks(fn, world, *args)` calls `fn(comm, *args)` on every rank (a raylane
Communicator over a fresh ProcessGroupGloo) and returns the results by rank.
`fn` must be importable (a module-level function).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback

from raylane.comm.process_group import connect, host_store


def _entry(fn, rank, world, port, timeout_s, args, out):
    try:
        import torch

        torch.set_num_threads(1)
        comm = connect("127.0.0.1", port, 0, rank, world, "gloo", timeout_s)
        out.put((rank, "ok", fn(comm, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout_s: float = 60.0) -> list:
    store = host_store("127.0.0.1", timeout_s)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, store.port, timeout_s, args, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s + 30
    try:
        while len(results) < world:
            try:
                rank, status, value = out.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead or time.monotonic() > deadline:
                    raise AssertionError(f"ranks {dead or 'all'} died or timed out; got {sorted(results)}")
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        del store
    return [results[r] for r in range(world)]
