"""Comm benchmark: wall time, bytes on the wire and memory of raylane's compressed collectives against
plain Gloo allreduce (and PyTorch DDP comm hooks), on the same gradients; and the quantization kernels'
throughput on one thread.

    python benchmarks/comm.py [--quick] [--sizes N,N] [--reps R]

4 worker processes joined by Gloo on loopback. For each size N, every worker builds the same model
(4 bias-free d x d Linear layers, 4 d^2 = N floats) and takes the gradients of its own batch: these
gradients are the data of every system. Each rep runs, per system, plain Gloo allreduce and then the
system on the same input (copied into a buffer kept across calls, for every system alike), so each
system has its own interleaved baseline. Rows per (system, size): wall_s (slowest worker; median,
min, max over reps), vs_gloo (median of the per-rep ratios to the paired Gloo call), wire_bytes
(/proc/self/io wchar per call), socket_payload_bytes (wire bytes minus Gloo's 48-byte headers per
message) against counted_bytes (raylane's Communicator), peak_mem_x (growth of the peak RSS during
one call after warm-up, over the tensor's bytes) and workspace_x (the Communicator's kept buffers,
over the tensor's bytes). est_1gbps_s adds the wire bytes at 1 Gbit/s to the wall time (a model).
Writes benchmarks/results/comm.json and comm.md through benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402

WORLD, LAYERS, BATCH = 4, 4, 8
FULL_SIZES, QUICK_SIZES = [2 ** 20, 2 ** 22, 2 ** 24, 2 ** 26], [2 ** 16, 2 ** 18]
QUANTIZED = ["int8", "int4", "fp4_e2m1", "fp4_e3m0"]  # presets in configs/compression/
HEADER = 48  # raylane.comm.wire.GLOO_HEADER_BYTES, per message sent and per receive posted


# -- worker side ---------------------------------------------------------------------------------
def _proc(path: str, key: str) -> int:
    for line in open(path):
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in {path}")


def _model(numel: int) -> torch.nn.Module:
    d = math.isqrt(numel // LAYERS)
    torch.manual_seed(0)  # the same weights on every worker
    return torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(LAYERS)])


def _batch(numel: int, rank: int) -> torch.Tensor:
    d = math.isqrt(numel // LAYERS)
    return torch.randn(BATCH, d, generator=torch.Generator().manual_seed(rank))


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=False)
    model(x).square().mean().backward()


def _one(comm, fn) -> dict:
    """One call after a barrier: wall seconds, bytes written, bytes counted, Gloo messages, peak RSS growth."""
    comm.barrier()
    stats = comm.stats.total()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
        f.write("5")
    rss0, count0, msgs0 = _proc("/proc/self/status", "VmRSS:"), stats.bytes_sent, (stats.messages_sent,
                                                                                     stats.messages_recv)
    wchar0, t0 = _proc("/proc/self/io", "wchar:"), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    wire, stats = _proc("/proc/self/io", "wchar:") - wchar0, comm.stats.total()
    headers = HEADER * (2 * (stats.messages_sent - msgs0[0]) + stats.messages_recv - msgs0[1])
    return {"wall_s": wall, "wire_bytes": wire, "counted_bytes": stats.bytes_sent - count0,
            "socket_payload_bytes": wire - headers,
            "peak_growth_bytes": 1024 * (_proc("/proc/self/status", "VmHWM:") - rss0)}


def _raylane_systems(comm, numel: int, grads: list[torch.Tensor], buf: torch.Tensor) -> dict:
    import torch.distributed as dist
    import yaml

    from raylane.comm import CompressionConfig, compressed_allgather, powersgd_allreduce, quantized_allreduce

    def preset(name: str):
        cfg = yaml.safe_load((ROOT / "configs" / "compression" / f"{name}.yaml").read_text())
        return CompressionConfig(**cfg).build(rank=comm.rank)

    flat, w = torch.cat([g.reshape(-1) for g in grads]), comm.world_size
    layer_bufs = [torch.empty_like(g) for g in grads]

    def fresh() -> torch.Tensor:  # the same input for every call, in a buffer kept across calls
        return buf.copy_(flat)

    def gloo_average():  # torch.distributed on its default group, averaged as DDP and raylane do
        dist.all_reduce(summed := fresh())
        return summed.div_(w)

    def layers():
        return [b.copy_(g) for b, g in zip(layer_bufs, grads)]

    systems = {"raylane allreduce": lambda: comm.allreduce(fresh(), "avg")}
    for name in QUANTIZED:
        systems[f"quantized {name}"] = lambda c=preset(name): quantized_allreduce(comm, fresh(), c, "avg")
    systems["topk 1% allgather"] = lambda c=preset("topk"): compressed_allgather(comm, fresh(), c, op="avg")
    systems["powersgd r4"] = lambda c=preset("powersgd"): powersgd_allreduce(comm, layers(), c, "avg")
    return gloo_average, systems


def _measure_interleaved(comm, gloo, systems: dict, reps: int, numel: int) -> dict:
    """Warm up each system once; then per rep, per system: Gloo allreduce, then the system. Each system
    has its own Communicator workspace (swapped in), so that its kept buffers are measured alone."""
    from raylane.comm.workspace import Workspace

    spaces = {name: Workspace() for name in systems}
    gloo()
    for name, fn in systems.items():
        comm.workspace = spaces[name]
        fn()
    runs: dict[str, list] = {name: [] for name in systems}
    paired: dict[str, list] = {name: [] for name in systems}
    for _ in range(reps):
        for name, fn in systems.items():
            comm.workspace = spaces[name]
            paired[name].append(_one(comm, gloo))
            runs[name].append(_one(comm, fn))
    rows = {"gloo allreduce": [r for rs in paired.values() for r in rs]}
    rows.update(runs)
    return {"rows": rows, "paired": paired, "workspace_bytes": {k: w.nbytes() for k, w in spaces.items()}}


def _ddp_rows(comm, numel: int, reps: int) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    def bf16_hook(state, bucket):
        """torch's bf16_compress_hook, unchanged; DDP refuses it by name on builds without CUDA."""
        return default_hooks.bf16_compress_hook(state, bucket)

    def powersgd(ddp):
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2, warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)

    hooks = {"ddp allreduce": None, "ddp bf16 hook": lambda ddp: ddp.register_comm_hook(None, bf16_hook),
             "ddp powerSGD hook r4": powersgd}
    rows, x = {}, _batch(numel, comm.rank)
    for name, register in hooks.items():
        # One bucket: with several, the PowerSGD hook's callbacks issue allreduces in a different order
        # on different ranks and Gloo deadlocks (seen here at 1M floats). raylane also sends one tensor.
        ddp = DDP(_model(numel), bucket_cap_mb=numel * 4 / 2 ** 20 + 1)
        if register:
            register(ddp)
        for _ in range(3):  # bucket rebuild after step 1; PowerSGD starts at step 2
            _step(ddp, x)

        def local():
            with ddp.no_sync():
                _step(ddp, x)
        synced, alone = [], []
        for _ in range(reps):
            synced.append(_one(comm, lambda: _step(ddp, x)))
            alone.append(_one(comm, local))
        rows[name] = {"wall_s": [s["wall_s"] - a["wall_s"] for s, a in zip(synced, alone)],
                      "wire_bytes": statistics.median(s["wire_bytes"] for s in synced)}
        del ddp
    return rows


def _worker(rank: int, port: int, sizes: list[int], reps: int, ddp: bool, out) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
        import torch.distributed as dist

        from raylane.comm import connect
        comm = connect("127.0.0.1", port, 0, rank, WORLD, "gloo", timeout_s=900)
        dist.init_process_group("gloo", store=dist.PrefixStore("ddp", comm.store), rank=rank, world_size=WORLD)
        for numel in sizes:
            model = _model(numel)
            _step(model, _batch(numel, rank))
            grads = [p.grad.detach().clone() for p in model.parameters()]
            del model
            gloo, systems = _raylane_systems(comm, numel, grads, torch.empty(numel))
            measured = _measure_interleaved(comm, gloo, systems, reps, numel)
            del grads, gloo, systems
            if ddp:
                measured["ddp"] = _ddp_rows(comm, numel, reps)
            out.put((rank, numel, measured))
        dist.destroy_process_group()
        out.put((rank, None, "done"))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback
        out.put((rank, None, traceback.format_exc() or repr(err)))


# -- kernels on one thread -------------------------------------------------------------------------
def _kernel_rows(numel: int, reps: int) -> list[dict]:
    """int8 / int4 / fp4 encode and decode of `numel` fp32 values into kept buffers, compiled and eager,
    interleaved with a plain copy into a kept buffer (the memory-bound reference)."""
    from raylane.comm import kernels
    from raylane.comm.blockcodec import BlockCodec
    from raylane.comm.quantizers import FP4Quantizer, IntQuantizer
    from raylane.comm.workspace import Workspace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 3
    out, copy_dst = torch.empty(numel), torch.empty(numel)
    rows = []
    try:
        for name, c in [("int8", IntQuantizer(8, 256)), ("int4", IntQuantizer(4, 256)),
                        ("fp4_e2m1", FP4Quantizer("e2m1", 128)), ("fp4_e3m0", FP4Quantizer("e3m0", 128))]:
            for compiled in (True, False):
                kernels.configure(compile=compiled, min_numel=1)
                codec = BlockCodec(c, Workspace())
                buf = torch.empty(c.payload_bytes((numel,), torch.float32), dtype=torch.uint8)
                steps = {"encode": lambda: codec.encode(x, buf), "decode": lambda: codec.decode(buf, numel, out, False),
                         "copy (reference)": lambda: copy_dst.copy_(x)}
                times: dict[str, list] = {k: [] for k in steps}
                for _ in range(reps + 1):  # the first round warms up (and compiles)
                    for k, fn in steps.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
                for k, ts in times.items():
                    if k.startswith("copy") and not (name == "int8" and compiled):
                        continue
                    ts = ts[1:]
                    rows.append({"system": f"kernel {k}" if k.startswith("copy") else
                                 f"kernel {name} {k} ({'compiled' if compiled else 'eager'})",
                                 "floats": numel, "wall_s": statistics.median(ts), "wall_min_s": min(ts),
                                 "wall_max_s": max(ts), "gb_per_s": 4 * numel / statistics.median(ts) / 1e9})
    finally:
        kernels.configure(compile=True, min_numel=1 << 20)
        torch.set_num_threads(threads)
    return rows


# -- driver side ---------------------------------------------------------------------------------
def _collect(sizes: list[int], reps: int, ddp: bool) -> list[dict]:
    from raylane.comm import host_store

    store = host_store("127.0.0.1", 900)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, store.port, sizes, reps, ddp, out), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    per_size: dict[int, list[dict]] = {}
    try:
        finished = 0
        while finished < WORLD:
            rank, numel, measured = out.get(timeout=3600)
            if numel is None:
                if measured != "done":
                    raise RuntimeError(f"worker {rank} failed:\n{measured}")
                finished += 1
                continue
            per_size.setdefault(numel, []).append(measured)
            print(f"  rank {rank} done with {numel:,} floats", flush=True)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    rows = []
    for numel, ranks in sorted(per_size.items()):
        rows += _merge(numel, ranks)
    return rows


def _slowest(ranks: list[list[dict]], key: str = "wall_s") -> list[float]:
    """Per rep, the slowest worker's value."""
    return [max(r[i][key] for r in ranks) for i in range(len(ranks[0]))]


def _merge(numel: int, ranks: list[dict]) -> list[dict]:
    """One row per system: medians and spreads over reps (slowest worker per rep), bytes per worker."""
    tensor_bytes, rows = 4 * numel, []
    gloo_walls = _slowest([r["rows"]["gloo allreduce"] for r in ranks])
    gloo_wire = statistics.median(statistics.mean(x["wire_bytes"] for x in r["rows"]["gloo allreduce"])
                                  for r in ranks)
    gloo_est = statistics.median(gloo_walls) + gloo_wire * 8 / 1e9
    for system in ranks[0]["rows"]:
        per_rank = [r["rows"][system] for r in ranks]
        walls = _slowest(per_rank)
        row = {"system": system, "floats": numel, "wall_s": statistics.median(walls), "wall_min_s": min(walls),
               "wall_max_s": max(walls)}
        if system != "gloo allreduce":
            ratios = [s / g for s, g in zip(walls, _slowest([r["paired"][system] for r in ranks]))]
            row.update(vs_gloo=statistics.median(ratios), vs_gloo_min=min(ratios), vs_gloo_max=max(ratios))
        for key in ("wire_bytes", "counted_bytes", "socket_payload_bytes"):
            row[key] = statistics.mean(statistics.median(x[key] for x in pr) for pr in per_rank)
        if system == "gloo allreduce":
            del row["counted_bytes"], row["socket_payload_bytes"]  # not sent through the Communicator
        row["est_1gbps_s"] = row["wall_s"] + row["wire_bytes"] * 8 / 1e9
        row["est_1gbps_vs_gloo"] = row["est_1gbps_s"] / gloo_est
        row["peak_growth_x"] = max(x["peak_growth_bytes"] for pr in per_rank for x in pr) / tensor_bytes
        row["workspace_x"] = max(r["workspace_bytes"].get(system, 0) for r in ranks) / tensor_bytes
        rows.append(row)
    for system, per_rank in (ranks[0].get("ddp") or {}).items():
        walls = [max(r["ddp"][system]["wall_s"][i] for r in ranks) for i in range(len(per_rank["wall_s"]))]
        wire = statistics.mean(r["ddp"][system]["wire_bytes"] for r in ranks)
        rows.append({"system": system, "floats": numel, "wall_s": statistics.median(walls),
                     "wall_min_s": min(walls), "wall_max_s": max(walls), "wire_bytes": wire,
                     "est_1gbps_s": statistics.median(walls) + wire * 8 / 1e9})
    return rows


def _claims(rows: list[dict], big: int) -> list[dict]:
    claims, size = [], max(r["floats"] for r in rows if "vs_gloo" in r)
    at = {(r["system"], r["floats"]): r for r in rows}
    for numel in sorted({r["floats"] for r in rows if r["floats"] >= big and "vs_gloo" in r}):
        for q in QUANTIZED:
            r = at[(f"quantized {q}", numel)]
            claims.append(_common.claim(f"quantized {q} wall / paired gloo allreduce wall, loopback ({numel:,} floats)",
                                        r["vs_gloo"], "<= 1.0", r["vs_gloo"] <= 1.0))
            claims.append(_common.claim(f"quantized {q} est. wall at 1 Gbit/s / gloo's ({numel:,} floats)",
                                        r["est_1gbps_vs_gloo"], "<= 0.6", r["est_1gbps_vs_gloo"] <= 0.6))
    gloo = at[("gloo allreduce", size)]
    for name, goal in [("quantized int8", 3.9), ("quantized int4", 7), ("quantized fp4_e3m0", 7),
                       ("topk 1% allgather", 20)]:
        v = gloo["wire_bytes"] / at[(name, size)]["wire_bytes"]
        claims.append(_common.claim(f"gloo allreduce wire bytes / {name} wire bytes ({size:,} floats)", v,
                                    f">= {goal}", v >= goal))
    for kind, goal in [("encode", 3.0), ("decode", 5.0)]:
        r = next(r for r in rows if r["system"] == f"kernel int8 {kind} (compiled)")
        claims.append(_common.claim(f"int8 {kind} GB/s of fp32, one thread ({r['floats']:,} floats)",
                                    r["gb_per_s"], f">= {goal}", r["gb_per_s"] >= goal))
    mem = max(r["peak_growth_x"] + r["workspace_x"] for r in rows if r["system"].startswith("quantized"))
    claims.append(_common.claim("max over quantized rows of (kept workspace + peak RSS growth in a call) / "
                                "tensor bytes", mem, "<= 2", mem <= 2))
    for label, pick in [("compressed-collective rows", lambda name: name != "raylane allreduce"),
                        ("raylane plain allreduce rows", lambda name: name == "raylane allreduce")]:
        diff = max(abs(r["counted_bytes"] - r["socket_payload_bytes"]) for r in rows
                   if "counted_bytes" in r and pick(r["system"]))
        claims.append(_common.claim(f"max |counted - socket payload bytes| over {label}, all sizes "
                                    "(socket: /proc/self/io wchar minus 48 B Gloo headers per counted message)",
                                    diff, "== 0", diff == 0))
    return claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {FULL_SIZES}")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")],
                        help="floats per worker, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-ddp", action="store_true", help="skip the DDP comm-hook rows")
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    t0, load_before = time.time(), os.getloadavg()
    rows = _kernel_rows(min(sizes[-1], 2 ** 24), args.reps)
    rows += _collect(sizes, args.reps, not args.no_ddp)
    big = 2 ** 24 if max(sizes) >= 2 ** 24 else max(sizes)
    claims = _claims(rows, big)
    for r in rows:
        for key in [k for k in r if k.endswith("_bytes")]:
            r[key.replace("_bytes", "_mb")] = r.pop(key) / 1e6
    notes = (f"{WORLD} workers on Gloo loopback, {args.reps} reps (+1 warm-up), {time.time() - t0:.0f} s in all; "
             f"load average before {', '.join(f'{x:.1f}' for x in load_before)} (after: see machine). "
             "wall: slowest worker per rep; median [min, max]. vs_gloo: per-rep ratio to the Gloo allreduce run "
             "just before it, median [min, max]. est_1gbps: wall + wire bytes at 1 Gbit/s (a model, no overlap). "
             "DDP rows: step time minus the same step under no_sync. Kernel rows: one thread, fp32 GB/s. "
             f"Goals at >= {big:,} floats; torch.compile on (default, tensors >= 2^20 values); quantized "
             "allreduces not pipelined (default pipeline_floats=0). "
             "socket_payload: wchar minus 48 B per Gloo message, messages from raylane.comm.wire "
             "(Gloo's ring allreduce caps segments at 1 MiB).")
    path = _common.write("comm", rows, claims, notes)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
