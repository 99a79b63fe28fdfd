"""GPU check of the comm layer (not a test: CI has no GPU; run it where one is lent).

What it checks, each recorded as a row of --out JSON (never an exception that stops the rest):
1. every compressor compresses and decompresses a CUDA tensor to the same bits as the same tensor
   on the CPU (deterministic settings), with the same payload bytes;
2. the int/fp4 kernels through torch.compile (Triton on a GPU) equal the eager kernels bit for bit;
3. a NCCL group through `raylane.comm.process_group.connect(backend="nccl")` runs the quantized
   allreduce, the compressed allgather and PowerSGD on CUDA tensors, counts the formula's bytes,
   and (world 1) returns what a round trip through the compressor gives;
4. two processes on the one GPU over NCCL (NCCL may refuse two ranks on one device: recorded);
5. encode/decode throughput of int8 on the GPU at 64M floats (GB/s of fp32 input).

Imports only raylane.comm (and what it imports: torch, zstandard). Usage:
`python benchmarks/gpu_check.py --out gpu_check.json [--device cpu]` (cpu: a dry run of the logic).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylane.comm import CompressionConfig, expected_bytes_sent, kernels  # noqa: E402
from raylane.comm.collectives import compressed_allgather, powersgd_allreduce, quantized_allreduce  # noqa: E402
from raylane.comm.process_group import connect, host_store  # noqa: E402

DETERMINISTIC = {"fp16": {}, "bf16": {}, "int8": {"name": "int", "bits": 8}, "int4": {"name": "int", "bits": 4},
                 "fp4_e2m1": {"name": "fp4", "format": "e2m1"}, "fp4_e3m0": {"name": "fp4", "format": "e3m0"},
                 "sign": {}, "topk": {"ratio": 0.01}, "randomk": {"ratio": 0.01, "seed": 3},
                 "powersgd": {"rank": 2}}


def _cfg(label: str) -> CompressionConfig:
    spec = dict(DETERMINISTIC[label])
    return CompressionConfig(name=spec.pop("name", label), **spec)


def _row(rows: list, check: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        detail = fn()
        rows.append({"check": check, "ok": bool(detail.pop("ok", True)), **detail})
    except Exception as e:  # noqa: BLE001 - recorded, the other checks go on
        rows.append({"check": check, "ok": False, "error": f"{type(e).__name__}: {e}",
                     "trace": traceback.format_exc()[-1500:]})
    rows[-1]["seconds"] = round(time.perf_counter() - t0, 3)
    print(f"{'ok  ' if rows[-1]['ok'] else 'FAIL'} {check} {rows[-1].get('error', '')}", flush=True)


def check_compressors_match_cpu(device: str, rows: list) -> None:
    x = torch.randn(3 * 2**16 + 77, generator=torch.Generator().manual_seed(0))
    for label in DETERMINISTIC:
        if label == "powersgd":
            continue

        def one(label=label):
            cpu, dev = _cfg(label).build(), _cfg(label).build()
            pc, pd = cpu.compress(x.clone(), key="k"), dev.compress(x.to(device), key="k")
            a, b = cpu.decompress(pc), dev.decompress(pd).cpu()
            return {"ok": torch.equal(a, b) and pc.nbytes == pd.nbytes, "bytes": pd.nbytes,
                    "max_abs_diff": float((a - b).abs().max())}
        _row(rows, f"compressor {label} on {device} == cpu", one)


def check_compiled_equals_eager(device: str, rows: list) -> None:
    n = 2**21 + 4096  # above the compile threshold
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    for label in ("int8", "int4", "fp4_e2m1", "fp4_e3m0"):
        def one(label=label):
            out = {}
            for compiled in (False, True):
                kernels.configure(compile=compiled, min_numel=2**20)
                c = _cfg(label).build()
                out[compiled] = c.decompress(c.compress(x.clone(), key="k"))
            ran = kernels.configure(compile=True)["compile"]  # False: compiling failed and fell back
            return {"ok": ran and torch.equal(out[False], out[True]), "compiled_ran": ran,
                    "max_abs_diff": float((out[False] - out[True]).abs().max())}
        _row(rows, f"compiled {label} == eager on {device}", one)


def _collectives(comm, device: str) -> dict:
    """Quantized allreduce, compressed allgather and PowerSGD on `comm`; bytes against the formula."""
    out, world = {}, comm.world_size
    x = torch.randn(2**20 + 333, generator=torch.Generator().manual_seed(2 + comm.rank)).to(device)
    for label in ("int8", "int4", "fp4_e2m1"):
        c = _cfg(label).build()
        before = comm.stats.total().bytes_sent
        got = quantized_allreduce(comm, x.clone(), c, op="sum", key=label)
        sent = comm.stats.total().bytes_sent - before
        want = expected_bytes_sent("quantized_allreduce", x.shape, x.dtype, world, comm.rank, c, comm.backend)
        rt = _cfg(label).build()
        same = world > 1 or torch.equal(got, rt.decompress(rt.compress(x.clone(), key=label)))
        out[label] = {"bytes_ok": sent == want, "sent": sent, "expected": want, "roundtrip_ok": same,
                      "finite": bool(torch.isfinite(got).all()), "device": str(got.device)}
    c = _cfg("topk").build()
    gathered = compressed_allgather(comm, x.clone(), c, op="sum", key="topk")
    out["topk"] = {"finite": bool(torch.isfinite(gathered).all()), "device": str(gathered.device)}
    mats = [torch.randn(256, 128, generator=torch.Generator().manual_seed(5)).to(device)]
    reduced = powersgd_allreduce(comm, [m.clone() for m in mats], _cfg("powersgd").build(), key="p")
    out["powersgd"] = {"finite": all(bool(torch.isfinite(r).all()) for r in reduced)}
    out["compile_still_on"] = kernels.configure()["compile"]  # a compile failure falls back, loudly
    kernels.configure(compile=True)
    out["ok"] = out["compile_still_on"] and all(v.get("bytes_ok", True) and v.get("roundtrip_ok", True) and v["finite"]
                    for k, v in out.items() if isinstance(v, dict))
    return out


def check_nccl_world1(device: str, rows: list) -> None:
    def one():
        store = host_store("127.0.0.1", 60)
        backend = "nccl" if device == "cuda" else "gloo"
        comm = connect("127.0.0.1", store.port, 0, 0, 1, backend, 60.0)
        return {"backend": backend, **_collectives(comm, device)}
    _row(rows, f"{'nccl' if device == 'cuda' else 'gloo'} world 1 collectives", one)


def _rank_entry(rank: int, port: int, backend: str, device: str, out) -> None:
    try:
        torch.cuda.set_device(0) if device == "cuda" else None
        comm = connect("127.0.0.1", port, 0, rank, 2, backend, 60.0)
        out.put((rank, _collectives(comm, device)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put((rank, {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}))


def check_two_ranks(device: str, backend: str, rows: list) -> None:
    def one():
        store = host_store("127.0.0.1", 60)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_rank_entry, args=(r, store.port, backend, device, q), daemon=True)
                 for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(2):
                rank, res = q.get(timeout=120)
                results[rank] = res
        finally:
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
        return {"ok": all(r.get("ok") for r in results.values()), "ranks": results}
    _row(rows, f"{backend} 2 ranks on one {device}", one)


def check_throughput(device: str, rows: list) -> None:
    def one():
        n = 2**26 if device == "cuda" else 2**22
        x = torch.randn(n, device=device)
        c = _cfg("int8").build()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        c.decompress(c.compress(x, key="t"))
        sync()
        enc, dec = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            p = c.compress(x, key="t")
            sync()
            t1 = time.perf_counter()
            c.decompress(p)
            sync()
            enc.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
        gb = n * 4 / 1e9
        return {"floats": n, "encode_gbps": round(gb / sorted(enc)[2], 2), "decode_gbps": round(gb / sorted(dec)[2], 2)}
    _row(rows, f"int8 encode/decode throughput on {device}", one)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    rows: list[dict] = []
    env = {"torch": torch.__version__, "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None}
    print(env, flush=True)
    check_compressors_match_cpu(args.device, rows)
    check_compiled_equals_eager(args.device, rows)
    check_nccl_world1(args.device, rows)
    if args.device == "cuda":
        check_two_ranks("cuda", "nccl", rows)
        check_two_ranks("cuda", "gloo", rows)
    else:
        check_two_ranks("cpu", "gloo", rows)
    check_throughput(args.device, rows)
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    lines = [f"# GPU check of raylane.comm ({env['gpu'] or 'cpu dry run'}, torch {env['torch']}, nccl {env['nccl']})",
             "", "| check | ok | detail |", "| --- | --- | --- |"]
    for r in rows:
        detail = r.get("error") or ", ".join(f"{k}={v}" for k, v in r.items()
                                             if k in ("bytes", "max_abs_diff", "encode_gbps", "decode_gbps", "floats"))
        lines.append(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {(str(detail).splitlines() or [""])[-1][:160]} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    failed = [r["check"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks ok; failed: {failed}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "4")
    sys.exit(main())
