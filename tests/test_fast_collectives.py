"""The rewritten compressed collectives give, on every rank, the same bits and the same byte counts as
the code before the speed work (tests/_reference_comm, a frozen copy), for every compressor, odd sizes,
fewer blocks than ranks, signed zeros, two calls in a row (stateful compressors), W = 2, 3, 4."""

import hashlib
import importlib
import io

import pytest
import torch

from tests.test_compressors import sample

pytestmark = pytest.mark.timeout(300)

SIZES = [(1,), (100,), (3, 5, 77), (4099,)]
MODULES = ["compressors", "quantizers", "sparse", "powersgd", "error_feedback", "collectives"]


def _mods(root: str):
    return {m: importlib.import_module(f"{root}.{m}") for m in MODULES}


def _quantized_cases(m) -> dict:
    q, c, s, ef = m["quantizers"], m["compressors"], m["sparse"], m["error_feedback"]
    return {"none": lambda: c.Identity(), "fp16": lambda: c.Fp16(), "bf16": lambda: c.Bf16(),
            "int8": lambda: q.IntQuantizer(8, 64), "int8_b256": lambda: q.IntQuantizer(8, 256),
            "int4": lambda: q.IntQuantizer(4, 64), "int4_b12": lambda: q.IntQuantizer(4, 12),
            "int8_sr": lambda: q.IntQuantizer(8, 64, stochastic=True, seed=1),
            "int4_sr": lambda: q.IntQuantizer(4, 32, stochastic=True, seed=2),
            "fp4_e2m1": lambda: q.FP4Quantizer("e2m1", 64), "fp4_e3m0": lambda: q.FP4Quantizer("e3m0", 32),
            "fp4_sr": lambda: q.FP4Quantizer("e2m1", 64, stochastic=True), "sign": lambda: q.SignQuantizer(64),
            "topk": lambda: s.TopK(0.1), "randomk": lambda: s.RandomK(0.1, seed=4),
            "ef_int4": lambda: ef.ErrorFeedback(q.IntQuantizer(4, 64))}


def _gather_cases(m) -> dict:
    q, c, s, ef = m["quantizers"], m["compressors"], m["sparse"], m["error_feedback"]
    return {"topk": lambda: s.TopK(0.1), "randomk": lambda: s.RandomK(0.05, seed=3),
            "int8": lambda: q.IntQuantizer(8, 64), "zstd": lambda: c.Zstd(q.IntQuantizer(8, 64), 3),
            "ef_topk": lambda: ef.ErrorFeedback(s.TopK(0.2))}


def _input(shape, dtype, rank: int, call: int) -> torch.Tensor:
    x = sample(shape, torch.float32, 10 * rank + call).reshape(-1)
    x[:70] = 0.0  # an all-zero block, then signed zeros
    x[70:90:2] = -0.0
    return x.view(shape).to(dtype)


def _digest(result) -> str:
    tensors = result if isinstance(result, list) else [result]
    return hashlib.sha256(b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                   for t in tensors)).hexdigest()


def _run_both(comm, new_fn, ref_fn) -> tuple:
    """(same bits, same counted bytes, digest of the new result)."""
    before = comm.stats.total().bytes_sent
    new = new_fn()
    mid = comm.stats.total().bytes_sent
    ref = ref_fn()
    after = comm.stats.total().bytes_sent
    return _digest(new) == _digest(ref), mid - before == after - mid, _digest(new)


def _battery(comm) -> bytes:
    new_m, ref_m = _mods("raylane.comm"), _mods("tests._reference_comm")
    new_col, ref_col = new_m["collectives"], ref_m["collectives"]
    r, out = comm.rank, {}
    new_q, ref_q = _quantized_cases(new_m), _quantized_cases(ref_m)
    for name in new_q:
        for shape in SIZES:
            for dtype, op in [(torch.float32, "sum"), (torch.float32, "avg")] + \
                             ([(torch.bfloat16, "avg")] if name == "int8" else []):
                cn, cr = new_q[name](), ref_q[name]()
                for call in range(2):
                    x = _input(shape, dtype, r, call)
                    out[("qar", name, shape, str(dtype), op, call)] = _run_both(
                        comm, lambda: new_col.quantized_allreduce(comm, x.clone(), cn, op, key="k"),
                        lambda: ref_col.quantized_allreduce(comm, x.clone(), cr, op, key="k"))
    new_g, ref_g = _gather_cases(new_m), _gather_cases(ref_m)
    for name in new_g:
        for shape, dtype in [((1155,), torch.float32), ((4099,), torch.float32), ((300,), torch.bfloat16)]:
            for op in (None, "sum", "avg"):
                cn, cr = new_g[name](), ref_g[name]()
                for call in range(2):
                    x = _input(shape, dtype, r, call)
                    out[("gather", name, shape, str(dtype), op, call)] = _run_both(
                        comm, lambda: new_col.compressed_allgather(comm, x.clone(), cn, op, key="g"),
                        lambda: ref_col.compressed_allgather(comm, x.clone(), cr, op, key="g"))
    for name, make in [("powersgd", lambda m: m["powersgd"].PowerSGD(rank=2)),
                       ("ef_powersgd", lambda m: m["error_feedback"].ErrorFeedback(m["powersgd"].PowerSGD(rank=3)))]:
        cn, cr = make(new_m), make(ref_m)
        for call in range(2):
            xs = [_input(s, torch.float32, r, call) for s in [(40, 30), (40, 3, 4), (7, 5)]]
            out[("powersgd", name, call)] = _run_both(
                comm, lambda: new_col.powersgd_allreduce(comm, [x.clone() for x in xs], cn, "avg", key="p"),
                lambda: ref_col.powersgd_allreduce(comm, [x.clone() for x in xs], cr, "avg", key="p"))
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_new_collectives_equal_the_reference_bit_for_bit_with_the_same_bytes(world):
    from tests.multiproc import run_ranks

    ranks = [torch.load(io.BytesIO(saved)) for saved in run_ranks(_battery, world, timeout_s=240)]
    for case in ranks[0]:
        for r, rank in enumerate(ranks):
            same_bits, same_bytes, digest = rank[case]
            assert same_bits, f"rank {r}: {case}: result differs from the reference"
            assert same_bytes, f"rank {r}: {case}: counted bytes differ from the reference"
            assert digest == ranks[0][case][2], f"{case}: rank {r} differs from rank 0"
