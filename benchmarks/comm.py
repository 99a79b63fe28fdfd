"""Comm benchmark: bytes on the wire and wall time of raylane's collectives and compressors, against
plain Gloo allreduce and PyTorch DDP comm hooks (bf16, PowerSGD), on the same gradients.

    python benchmarks/comm.py [--quick]

4 worker processes joined by Gloo on loopback. For each size N, every worker builds the same model
(4 bias-free d x d Linear layers, 4 d^2 = N floats) and takes the gradients of its own batch: these
gradients are the data of every system. raylane systems reduce them (flattened, or per layer for
PowerSGD); DDP systems run a real DDP backward with the hook. Rows, per (system, size):
wire_bytes (what the worker wrote to its sockets per call, /proc/self/io wchar, Gloo headers
included), counted_bytes and expected_bytes (raylane's Communicator count and formula), wall_s
(slowest worker, median of the reps; for DDP: step time minus the same step without sync).
Writes benchmarks/results/comm.json and comm.md; claims are ratios of the rows, checked here.
"""

from __future__ import annotations

import argparse
import json
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

WORLD, LAYERS, BATCH = 4, 4, 8
FULL_SIZES, QUICK_SIZES = [2 ** 20, 2 ** 22, 2 ** 24, 2 ** 26], [2 ** 16, 2 ** 18]
QUANTIZED = ["int8", "int4", "fp4_e2m1", "fp4_e3m0"]  # presets in configs/compression/


# -- worker side ---------------------------------------------------------------------------------
def _wchar() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


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


def _measure(comm, fn, reps: int) -> dict:
    """Warm up once, then per rep: barrier, call, (wall seconds, bytes written, bytes counted)."""
    fn()
    walls, wire, counted = [], [], []
    for _ in range(reps):
        comm.barrier()
        count0, wchar0, t0 = comm.stats.total().bytes_sent, _wchar(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        wire.append(_wchar() - wchar0)
        counted.append(comm.stats.total().bytes_sent - count0)
    return {"wall_s": statistics.median(walls), "wire_bytes": statistics.median(wire),
            "counted_bytes": statistics.median(counted)}


def _raylane_systems(comm, numel: int, grads: list[torch.Tensor]) -> dict:
    import torch.distributed as dist
    import yaml

    from raylane.comm import CompressionConfig, compressed_allgather, powersgd_allreduce, quantized_allreduce
    from raylane.comm.collectives import expected_bytes_sent

    def preset(name: str):
        cfg = yaml.safe_load((ROOT / "configs" / "compression" / f"{name}.yaml").read_text())
        return CompressionConfig(**cfg).build(rank=comm.rank)

    flat, w, r = torch.cat([g.reshape(-1) for g in grads]), comm.world_size, comm.rank
    shapes, f32 = [g.shape for g in grads], torch.float32
    def gloo_average():  # torch.distributed on its default group, averaged as DDP and raylane do
        dist.all_reduce(summed := flat.clone())
        return summed.div_(w)

    systems = {"gloo allreduce": (gloo_average, None),
               "raylane allreduce": (lambda: comm.allreduce(flat.clone(), "avg"),
                                     expected_bytes_sent("allreduce", numel, f32, w, r))}
    for name in QUANTIZED:
        c = preset(name)
        systems[f"quantized {name}"] = (lambda c=c: quantized_allreduce(comm, flat.clone(), c, "avg"),
                                        expected_bytes_sent("quantized_allreduce", numel, f32, w, r, c))
    topk = preset("topk")
    systems["topk 1% allgather"] = (lambda: compressed_allgather(comm, flat.clone(), topk, op="avg"),
                                    expected_bytes_sent("compressed_allgather", numel, f32, w, r, topk))
    psgd = preset("powersgd")
    systems["powersgd r4"] = (lambda: powersgd_allreduce(comm, [g.clone() for g in grads], psgd, "avg"),
                              expected_bytes_sent("powersgd_allreduce", shapes, f32, w, r, psgd))
    return systems


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
        synced, alone = _measure(comm, lambda: _step(ddp, x), reps), _measure(comm, local, reps)
        rows[name] = {"wall_s": synced["wall_s"] - alone["wall_s"], "wire_bytes": synced["wire_bytes"],
                      "step_s": synced["wall_s"], "local_step_s": alone["wall_s"]}
        del ddp
    return rows


def _worker(rank: int, port: int, sizes: list[int], reps: int, out) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
        import torch.distributed as dist

        from raylane.comm import connect
        comm = connect("127.0.0.1", port, 0, rank, WORLD, "gloo", timeout_s=600)
        dist.init_process_group("gloo", store=dist.PrefixStore("ddp", comm.store), rank=rank, world_size=WORLD)
        for numel in sizes:
            model = _model(numel)
            _step(model, _batch(numel, rank))
            grads = [p.grad.detach().clone() for p in model.parameters()]
            del model
            rows = {}
            for name, (fn, expected) in _raylane_systems(comm, numel, grads).items():
                rows[name] = {**_measure(comm, fn, reps), "expected_bytes": expected}
                if expected is None:  # not sent through the Communicator: nothing counted
                    del rows[name]["counted_bytes"], rows[name]["expected_bytes"]
            del grads
            rows.update(_ddp_rows(comm, numel, reps))
            out.put((rank, numel, rows))
        dist.destroy_process_group()
        out.put((rank, None, "done"))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback
        out.put((rank, None, traceback.format_exc() or repr(err)))


# -- driver side ---------------------------------------------------------------------------------
def _collect(sizes: list[int], reps: int) -> list[dict]:
    from raylane.comm import host_store

    store = host_store("127.0.0.1", 900)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, store.port, sizes, reps, out), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    per_rank: dict[tuple[int, str], list[dict]] = {}
    try:
        finished = 0
        while finished < WORLD:
            rank, numel, rows = out.get(timeout=1800)
            if numel is None:
                if rows != "done":
                    raise RuntimeError(f"worker {rank} failed:\n{rows}")
                finished += 1
                continue
            for system, row in rows.items():
                per_rank.setdefault((numel, system), []).append(row)
            print(f"  rank {rank} done with {numel:,} floats", flush=True)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [_merge(system, numel, rows) for (numel, system), rows in per_rank.items()]


def _merge(system: str, numel: int, rows: list[dict]) -> dict:
    """One row per (system, size): slowest worker's time, mean bytes per worker."""
    merged = {"system": system, "floats": numel, "wall_s": max(r["wall_s"] for r in rows),
              "wire_bytes": statistics.mean(r["wire_bytes"] for r in rows)}
    for key in ("counted_bytes", "expected_bytes"):
        if rows[0].get(key) is not None:
            merged[key] = statistics.mean(r[key] for r in rows)
    for key in ("step_s", "local_step_s"):
        if key in rows[0]:
            merged[key] = max(r[key] for r in rows)
    merged["est_wall_1gbps_s"] = merged["wall_s"] + merged["wire_bytes"] * 8 / 1e9
    return merged


def _holds(value: float, goal: str) -> bool:
    op, target = goal.split()
    return {">=": value >= float(target), "<=": value <= float(target), "==": value == float(target)}[op]


def _claims(rows: list[dict]) -> list[dict]:
    size = max(r["floats"] for r in rows)
    at = {r["system"]: r for r in rows if r["floats"] == size}
    gloo = at["gloo allreduce"]

    def ratio(a: str, b: str, key: str) -> float:
        return round(at[a][key] / at[b][key], 3)
    claims = [(f"gloo allreduce wire bytes / raylane allreduce wire bytes ({size:,} floats)",
               ratio("gloo allreduce", "raylane allreduce", "wire_bytes"), ">= 0.99")]
    d = math.isqrt(size // LAYERS)  # PowerSGD sends 2 d r floats per d x d layer: nominal ratio d / 2r
    for name, goal in [("quantized int8", ">= 3.9"), ("quantized int4", ">= 7"), ("quantized fp4_e2m1", ">= 7"),
                       ("quantized fp4_e3m0", ">= 7"), ("topk 1% allgather", ">= 20"),
                       ("powersgd r4", f">= {0.9 * d / 8:g}")]:
        claims.append((f"gloo allreduce wire bytes / {name} wire bytes", ratio("gloo allreduce", name, "wire_bytes"),
                       goal))
    claims += [("ddp bf16 hook wire bytes / quantized int8 wire bytes",
                ratio("ddp bf16 hook", "quantized int8", "wire_bytes"), ">= 1.9"),
               ("ddp powerSGD hook wire bytes / raylane powersgd wire bytes",
                ratio("ddp powerSGD hook r4", "powersgd r4", "wire_bytes"), ">= 0.95"),
               ("raylane allreduce wall / gloo allreduce wall",
                ratio("raylane allreduce", "gloo allreduce", "wall_s"), "<= 1.25"),
               ("quantized int8 wall / gloo allreduce wall (loopback)",
                ratio("quantized int8", "gloo allreduce", "wall_s"), "<= 1"),
               ("quantized int8 est. wall at 1 Gbit/s / gloo allreduce's",
                ratio("quantized int8", "gloo allreduce", "est_wall_1gbps_s"), "<= 1"),
               ("powersgd r4 wall / ddp powerSGD hook comm time",
                ratio("powersgd r4", "ddp powerSGD hook r4", "wall_s"), "<= 1.5"),
               ("max abs(counted - expected) bytes over raylane rows, all sizes",
                max(abs(r["counted_bytes"] - r["expected_bytes"]) for r in rows if "expected_bytes" in r), "== 0")]
    return [{"claim": c, "value": v, "goal": g, "holds": _holds(v, g)} for c, v, g in claims]


def _markdown(result: dict) -> str:
    lines = [f"# {result['benchmark']}", "", f"`{result['command']}` on {result['machine']}", "",
             "| system | floats | wire MB/worker | vs gloo bytes | counted MB | expected MB | wall s | vs gloo time "
             "| est. 1 Gbit/s s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["floats"]: r for r in result["rows"] if r["system"] == "gloo allreduce"}
    for r in result["rows"]:
        b = base[r["floats"]]
        mb = {k: f"{r[k] / 1e6:.3f}" if k in r else "" for k in ("wire_bytes", "counted_bytes", "expected_bytes")}
        lines.append(f"| {r['system']} | {r['floats']:,} | {mb['wire_bytes']} "
                     f"| {b['wire_bytes'] / r['wire_bytes']:.2f}x "
                     f"| {mb['counted_bytes']} | {mb['expected_bytes']} | {r['wall_s']:.3f} "
                     f"| {r['wall_s'] / b['wall_s']:.2f} | {r['est_wall_1gbps_s']:.3f} |")
    lines += ["", "| claim | value | goal | holds |", "|---|---:|---|---|"]
    lines += [f"| {c['claim']} | {c['value']} | {c['goal']} | {c['holds']} |" for c in result["claims"]]
    lines += ["", "wall s: slowest worker, median of the reps; DDP rows: step time minus the same step under "
              "no_sync (exposed comm time). est. 1 Gbit/s: wall s + wire bytes at 1 Gbit/s (a model, not measured)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {FULL_SIZES}")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")],
                        help="floats per worker, comma-separated")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    reps = args.reps or (5 if args.quick else 3)
    t0, load_before = time.time(), os.getloadavg()[0]
    rows = sorted(_collect(sizes, reps), key=lambda r: (r["floats"], r["system"]))
    load = f"load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end (other work skews wall times)"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    result = {"benchmark": "comm", "command": "python benchmarks/comm.py" + " ".join([""] + sys.argv[1:]),
              "machine": f"{os.cpu_count()} cores, {mem_gb:.0f} GB, no GPU, torch {torch.__version__}, "
                         f"{WORLD} workers on Gloo loopback, {reps} reps, {time.time() - t0:.0f} s in all; {load}",
              "rows": rows, "claims": _claims(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comm.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "comm.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
