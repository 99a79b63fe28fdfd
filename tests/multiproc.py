"""Run a function on W spawned processes joined by a Gloo group; always reap them.

`run_ranks(fn, world, *args)` calls `fn(comm, *args)` on every rank (a raylane
Communicator over a fresh ProcessGroupGloo) and returns the results by rank.
`fn` must be importable (a module-level function).
"""

from __future__ import annotations

import traceback

from benchmarks._spawn import spawn_ranks
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
    try:
        return spawn_ranks(_entry, [(fn, r, world, store.port, timeout_s, args) for r in range(world)], timeout_s + 30)
    finally:
        del store


def run_workers_in_threads(cfg, world: int, fn) -> list:
    """`fn(worker)` on each of `world` TrainWorkers (plain objects, no Ray) connected in threads: the results."""
    import threading

    from raylane.workers.worker import TrainWorker

    store = host_store("127.0.0.1", 30)
    workers = [TrainWorker(cfg, r) for r in range(world)]
    out, errors = [None] * world, []

    def body(r: int) -> None:
        try:
            workers[r].connect("127.0.0.1", store.port, 0, r, world, "gloo", 30.0)
            out[r] = fn(workers[r])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out
