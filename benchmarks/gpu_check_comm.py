"""GPU check of raylane.comm's bits on one CUDA device (a script run by hand, not a test).

Needs only torch (+ triton for the compiled kernels) and raylane.comm: no ray, hydra, wandb, zstandard,
omegaconf. Sections, each recorded in the JSON written to --out:

1. quantizers: every deterministic compressor's payload and reconstruction on the device equal the
   CPU's bit for bit (top-k: the same positions, listed in any order). Not comparable, recorded with
   the largest difference: stochastic rounding (the device's generator), sign (block |x| sums in
   another order), PowerSGD (matmul summation order);
2. kernels: the eager int/fp4 kernels on the device equal the CPU's; the torch.compile'd (Triton)
   ones, forced on with `kernels.configure(compile_gpu=True)`, are compared with eager (they are off
   on GPUs by default: Triton's fp32 division and fused multiply-adds);
3. nccl_world1: a world-1 NCCL group from `raylane.comm.process_group.connect(backend="nccl")` runs
   each compressed collective (pipelined too) and gets the CPU's bits (at world size 1 the
   collectives exchange nothing, so a plain NCCL allreduce is run on the group as well);
4. two_ranks: two processes on the one GPU over NCCL (NCCL refuses two ranks on one device: then the
   error is recorded), and two processes over Gloo with CUDA tensors, whose results must equal the
   same group's results on CPU tensors, on both ranks.

`--device cpu` runs the same logic on the CPU (Gloo for NCCL) to check the script itself.
Usage: python benchmarks/gpu_check_comm.py --out gpu_check_comm.json [--device cuda] [--numel 1048576]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import platform
import queue
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raylane.comm import Communicator, connect, host_store, kernels, pipeline  # noqa: E402
from raylane.comm.collectives import compressed_allgather, powersgd_allreduce, quantized_allreduce  # noqa: E402
from raylane.comm.compressors import Bf16, Fp16  # noqa: E402
from raylane.comm.powersgd import PowerSGD  # noqa: E402
from raylane.comm.quantizers import FP4Quantizer, IntQuantizer, SignQuantizer  # noqa: E402
from raylane.comm.sparse import RandomK, TopK  # noqa: E402

DETERMINISTIC = {"int8": lambda: IntQuantizer(8, 256), "int4": lambda: IntQuantizer(4, 64),
                 "fp4_e2m1": lambda: FP4Quantizer("e2m1", 256), "fp4_e3m0": lambda: FP4Quantizer("e3m0", 32),
                 "fp16": Fp16, "bf16": Bf16, "topk": lambda: TopK(0.01), "randomk": lambda: RandomK(0.01, seed=3)}
NOT_COMPARABLE = {"int8_stochastic": (lambda: IntQuantizer(8, 256, stochastic=True, seed=1), "device RNG"),
                  "fp4_stochastic": (lambda: FP4Quantizer("e2m1", 256, stochastic=True, seed=1), "device RNG"),
                  "powersgd": (lambda: PowerSGD(4), "matmul summation order (cuBLAS vs CPU BLAS)"),
                  "sign": (lambda: SignQuantizer(256), "block |x| sums in another order (mean |x| scale)")}
ALLREDUCED = ["int8", "int4", "fp4_e2m1", "fp4_e3m0", "fp16", "bf16"]


def digest(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def sample(numel: int, seed: int) -> torch.Tensor:
    """Heavy-tailed values, an all-zero block, signed zeros, exact e2m1 grid midpoints (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.randn(numel, generator=g).exp() * 3
    x[:256] = 0.0
    x[256:512:2] = -0.0
    mids = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]).repeat(32)
    x[512:768] = mids * torch.tensor([1.0, -1.0]).repeat(128)
    return x


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max()) if a.numel() else 0.0


# -- 1. quantizers ------------------------------------------------------------------------------
def check_quantizers(dev: str, numel: int) -> dict:
    x = sample(numel, 0)
    out = {}
    for name, make in DETERMINISTIC.items():
        cc, cd = make(), make()
        pc, pd = cc.compress(x, "k"), cd.compress(x.to(dev, copy=True), "k")
        bc, bd = pc.to_bytes(), pd.to_bytes()
        same_payload = digest(bc) == digest(bd)
        if name == "topk":  # the device's topk may list the same positions in another order
            pos_c = cc.from_bytes(bc, x.shape, x.dtype).parts["indices"].sort().values
            pos_d = cd.from_bytes(bd.cpu(), x.shape, x.dtype).parts["indices"].sort().values
            same_payload = digest(pos_c) == digest(pos_d)
        out[name] = {"payload_equal": same_payload,
                     "decode_equal": digest(cc.decompress(pc)) == digest(cd.decompress(pd)),
                     "device_decodes_cpu_payload_equal": digest(cd.decompress(cd.from_bytes(bc.to(dev), x.shape, x.dtype)))
                     == digest(cc.decompress(pc))}
    for name, (make, why) in NOT_COMPARABLE.items():
        xin = x.view(1024, -1) if name == "powersgd" else x
        cc, cd = make(), make()
        rc, rd = cc.decompress(cc.compress(xin, "k")), cd.decompress(cd.compress(xin.to(dev, copy=True), "k"))
        out[name] = {"comparable": False, "why": why, "max_abs_diff": _max_diff(rc, rd),
                     "max_abs_value": float(xin.abs().max())}
    return out


# -- 2. kernels ---------------------------------------------------------------------------------
def _kernel_outputs(x: torch.Tensor, dev: str) -> dict:
    xd, n, nb = x.to(dev), x.numel(), x.shape[0]
    res = {}
    for kind in ("int8", "int4", "e2m1", "e3m0"):
        scales = torch.empty(nb, device=dev)
        codes = torch.empty(n if kind == "int8" else n // 2, dtype=torch.uint8, device=dev)
        scratch, iscratch = torch.empty(n, device=dev), torch.empty(n, dtype=torch.int32, device=dev)
        if kind.startswith("int"):
            bits = int(kind[3:])
            kernels.encode_int(xd, 2 ** (bits - 1) - 1, bits, None, scales,
                               codes.view(torch.int8) if bits == 8 else codes, scratch, iscratch)
        else:
            grid = FP4Quantizer(kind, x.shape[1]).grid
            kernels.encode_fp4(xd, grid, scales, codes, scratch, iscratch)
        outs = []
        for accumulate in (False, True):
            y = torch.full((nb, x.shape[1]), 0.5, device=dev)
            if kind.startswith("int"):
                kernels.decode_int(codes, scales, int(kind[3:]), y, accumulate, scratch, iscratch)
            else:
                kernels.decode_fp4(codes, scales, grid, y, accumulate, scratch, iscratch)
            outs.append(digest(y))
        res[kind] = {"scales": digest(scales), "codes": digest(codes), "decode": outs[0], "accumulate": outs[1]}
    return res


def check_kernels(dev: str, numel: int) -> dict:
    x = sample(numel, 1).view(-1, 256)
    saved = kernels.configure()
    try:
        kernels.configure(compile=False)
        cpu, eager = _kernel_outputs(x, "cpu"), _kernel_outputs(x, dev)
        kernels.configure(compile=True, min_numel=0, compile_gpu=True)
        t0 = time.monotonic()
        compiled = _kernel_outputs(x, dev)
        compile_s = time.monotonic() - t0
        compiled_ok = kernels.configure()["compile"]  # False: compiling failed, eager ran instead
    finally:
        kernels.configure(compile=saved["compile"], min_numel=saved["min_numel"], compile_gpu=saved["compile_gpu"])
    out = {"compiled_path_ran": compiled_ok, "first_calls_s": round(compile_s, 2)}
    for kind in cpu:
        out[kind] = {"eager_equals_cpu": eager[kind] == cpu[kind],
                     "compiled_vs_eager_parts": {k: compiled[kind][k] == eager[kind][k] for k in eager[kind]}}
    return out


# -- 3. collectives on one group ----------------------------------------------------------------
def _collective_digests(comm: Communicator, x: torch.Tensor, dev: str) -> dict:
    """Every compressed collective on a copy of x on dev, by name: digest of the result."""
    res = {}
    for name in ALLREDUCED:
        got = quantized_allreduce(comm, x.to(dev, copy=True), DETERMINISTIC[name](), "avg", "q")
        res[f"quantized_allreduce/{name}"] = digest(got)
    saved = pipeline.configure()["pipeline_floats"]
    try:
        pipeline.configure(pipeline_floats=x.numel() // 8)
        for name in ("int8", "fp4_e2m1"):
            got = quantized_allreduce(comm, x.to(dev, copy=True), DETERMINISTIC[name](), "avg", "q")
            res[f"pipelined/{name}"] = digest(got)
    finally:
        pipeline.configure(pipeline_floats=saved)
    for name in ("topk", "randomk", "int8"):
        got = compressed_allgather(comm, x.to(dev, copy=True), DETERMINISTIC[name](), "avg", "g")
        res[f"allgather_avg/{name}"] = digest(got)
    return res


def _powersgd(comm: Communicator, x: torch.Tensor, dev: str) -> torch.Tensor:
    return powersgd_allreduce(comm, [x.view(1024, -1).to(dev, copy=True)], PowerSGD(4), "avg", "p")[0].cpu()


def check_world1(dev: str, numel: int) -> dict:
    x = sample(numel, 2)
    kernels.configure(min_numel=1 << 16)
    ref = _collective_digests(Communicator(None, 0, 1), x, "cpu")
    store = host_store("127.0.0.1", 60)
    backend = "nccl" if dev != "cpu" else "gloo"
    comm = connect("127.0.0.1", store.port, 0, 0, 1, backend, 60)
    got = _collective_digests(comm, x, dev)
    probe = torch.ones(8, device=dev)
    comm.pg.allreduce([probe]).wait()  # the collectives above exchanged nothing at world 1
    psgd = _max_diff(_powersgd(comm, x, dev), _powersgd(Communicator(None, 0, 1), x, "cpu"))
    return {"backend": backend, "plain_allreduce_ok": bool((probe.cpu() == 1).all()),
            "equal_to_cpu": {k: got[k] == ref[k] for k in ref}, "powersgd_max_abs_diff_vs_cpu": psgd}


# -- 4. two processes on one device -------------------------------------------------------------
def _rank(rank: int, port: int, dev: str, backend: str, numel: int, out) -> None:
    try:
        torch.set_num_threads(2)
        if dev != "cpu":
            torch.cuda.set_device(0)
        comm = connect("127.0.0.1", port, 0, rank, 2, backend, 60)
        kernels.configure(min_numel=1 << 16)
        x = sample(numel, 10 + rank)
        if backend == "nccl":
            t = torch.full((4,), float(rank + 1), device=dev)
            comm.allreduce(t)
            out.put((rank, "ok", {"allreduce": t.cpu().tolist(), **_collective_digests(comm, x, dev)}))
            return
        on_dev, on_cpu = _collective_digests(comm, x, dev), _collective_digests(comm, x, "cpu")
        out.put((rank, "ok", {"device": on_dev, "cpu": on_cpu}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()[-1500:]))


def _two(dev: str, backend: str, numel: int, timeout_s: float) -> dict:
    store = host_store("127.0.0.1", timeout_s)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, store.port, dev, backend, numel, out), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                rank, status, value = out.get(timeout=1.0)
                got[rank] = {"status": status, "value": value}
            except queue.Empty:
                if all(p.exitcode is not None for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
    for r in (0, 1):
        got.setdefault(r, {"status": "timeout or died", "value": f"exit code {procs[r].exitcode}"})
    return got


def check_two_ranks(dev: str, numel: int) -> dict:
    res = {}
    if dev != "cpu":
        nccl = _two(dev, "nccl", numel, 90)
        res["nccl_two_ranks_one_gpu"] = {"ran": all(v["status"] == "ok" for v in nccl.values()), "ranks": nccl,
                                         "expected": "NCCL refuses two ranks on one GPU (Duplicate GPU detected)"}
    gloo = _two(dev, "gloo", numel, 150)
    ok = all(v["status"] == "ok" for v in gloo.values())
    summary = {"ran": ok}
    if ok:
        r0, r1 = gloo[0]["value"], gloo[1]["value"]
        summary["device_equals_cpu"] = {k: r0["device"][k] == r0["cpu"][k] and r1["device"][k] == r1["cpu"][k]
                                        for k in r0["cpu"]}
        summary["ranks_agree"] = r0["device"] == r1["device"]
    else:
        summary["ranks"] = gloo
    res["gloo_on_device_tensors"] = summary
    return res


def _failures(node, path: str = "") -> list[str]:
    """Paths of every False bool (a failed equality, a section that did not run)."""
    bad = []
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}/{k}"
            if v is False and k != "comparable":
                bad.append(p)
            elif isinstance(v, dict):
                bad += _failures(v, p)
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the script itself)")
    parser.add_argument("--numel", type=int, default=1 << 20, help="values per tensor (a multiple of 1024)")
    args = parser.parse_args()
    dev = args.device
    if dev != "cpu" and not torch.cuda.is_available():
        sys.exit("gpu_check_comm: no CUDA device; use --device cpu to check the script")
    report = {"device": torch.cuda.get_device_name(0) if dev != "cpu" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "numel": args.numel, "sections": {}}
    for name, fn in [("quantizers", check_quantizers), ("kernels", check_kernels), ("nccl_world1", check_world1),
                     ("two_ranks", check_two_ranks)]:
        t0 = time.monotonic()
        try:
            report["sections"][name] = fn(dev, args.numel)
        except Exception:  # noqa: BLE001 - recorded; the other sections still run
            report["sections"][name] = {"ran": False, "error": traceback.format_exc()[-2000:]}
        report["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"{name}: {report['sections'][name]['seconds']} s", flush=True)
    report["failures"] = _failures(report["sections"])
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu_check_comm on {report['device']}, torch {report['torch']}: "
          f"{len(report['failures'])} false checks" + "".join(f"\n  {f}" for f in report["failures"]))


if __name__ == "__main__":
    main()
