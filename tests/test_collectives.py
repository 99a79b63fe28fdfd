"""Compressed collectives on 3 Gloo processes: same bits on every rank, within the bound of an
fp64 reference, counted bytes equal to the formulas (and to what Gloo writes), async handles."""

import io
import math

import pytest
import torch

from raylane.comm import wire
from raylane.comm.collectives import (chunk_ranges, compressed_allgather, expected_bytes_sent, powersgd_allreduce,
                                      quantized_allreduce)
from raylane.comm.compressors import Bf16, Cast, Fp16, Identity, Zstd
from raylane.comm.error_feedback import ErrorFeedback
from raylane.comm.powersgd import PowerSGD
from raylane.comm.quantizers import FP4Quantizer, IntQuantizer, SignQuantizer
from raylane.comm.sparse import RandomK, TopK
from tests.test_compressors import GRIDS, UNIT_ROUNDOFF, round_trip_bound, sample

pytestmark = pytest.mark.timeout(180)

WORLD, SHAPE = 3, (3, 5, 77)  # 1155 values: 19 blocks of 64, the last one partial


def quantizing() -> dict:
    return {"none": Identity(), "fp16": Fp16(), "bf16": Bf16(), "int8": IntQuantizer(8, 64),
            "int4": IntQuantizer(4, 64), "int4_sr": IntQuantizer(4, 64, stochastic=True),
            "fp4_e2m1": FP4Quantizer("e2m1", 64), "fp4_e3m0": FP4Quantizer("e3m0", 64), "sign": SignQuantizer(64),
            "topk": TopK(0.1), "randomk": RandomK(0.1, seed=4), "ef_int4": ErrorFeedback(IntQuantizer(4, 64))}


def _wchar() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _measured(comm, fn):
    """(result, counted bytes, bytes written to sockets minus Gloo's per-message headers)."""
    stats = comm.stats.total()
    before, sent, msgs_out, msgs_in = _wchar(), stats.bytes_sent, stats.messages_sent, stats.messages_recv
    result = fn()
    written, stats = _wchar() - before, comm.stats.total()
    headers = wire.GLOO_HEADER_BYTES * (2 * (stats.messages_sent - msgs_out) + stats.messages_recv - msgs_in)
    return result, stats.bytes_sent - sent, written - headers


def _low_rank(rank: int) -> list[torch.Tensor]:
    """Matrices whose sum over ranks has rank 2 (a shared column space)."""
    shared = torch.randn(40, 2, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(rank)
    return [shared @ torch.randn(2, 30, generator=g), (shared @ torch.randn(2, 12, generator=g)).view(40, 3, 4)]


def _battery(comm) -> bytes:
    """Every case on every rank, in the same order; the parent checks the results.

    Returned as torch.save bytes: tensors sent through the queue as shared memory would not
    outlive the process.
    """
    out, r = {}, comm.rank
    for name, c in quantizing().items():
        out[name] = _measured(comm, lambda: quantized_allreduce(comm, sample(SHAPE, torch.float32, r), c, "sum"))
    out["int8_bf16_avg"] = _measured(comm, lambda: quantized_allreduce(
        comm, sample(SHAPE, torch.bfloat16, r), IntQuantizer(8, 64), "avg"))
    out["few_blocks"] = _measured(comm, lambda: quantized_allreduce(comm, sample((100,), torch.float32, r),
                                                                    IntQuantizer(8, 64), "sum"))
    sparse = sample((4000,), torch.float32, r)
    sparse[: 1000 * (r + 1)] = 0  # each rank compresses differently well
    out["zstd_gather"] = _measured(comm, lambda: compressed_allgather(comm, sparse, Zstd(IntQuantizer(8, 64), 3)))
    out["zstd_nbytes"] = Zstd(IntQuantizer(8, 64), 3).compress(sparse).nbytes
    out["topk_gather_sum"] = _measured(comm, lambda: compressed_allgather(
        comm, sample(SHAPE, torch.float32, r), TopK(0.1), op="sum"))
    out["powersgd"] = _measured(comm, lambda: powersgd_allreduce(comm, _low_rank(r), PowerSGD(rank=2), "sum"))
    out["async"] = _async_results(comm)
    try:
        quantized_allreduce(comm, torch.full((10,), float("nan")), IntQuantizer())
    except ValueError as err:
        out["nan_error"] = str(err)
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def _async_results(comm) -> list:
    r = comm.rank
    handles = [quantized_allreduce(comm, sample(SHAPE, torch.float32, r), IntQuantizer(4, 64), "sum", async_op=True),
               compressed_allgather(comm, sample(SHAPE, torch.float32, r), TopK(0.1), op="sum", async_op=True),
               powersgd_allreduce(comm, _low_rank(r), PowerSGD(rank=2), "sum", async_op=True)]
    busy = torch.randn(300, 300) @ torch.randn(300, 300)  # compute while they run
    results = [h.wait() for h in handles]
    assert all(h.is_completed() for h in handles) and busy.isfinite().all()
    return results


@pytest.fixture(scope="module")
def ranks():
    from tests.multiproc import run_ranks

    return [torch.load(io.BytesIO(saved)) for saved in run_ranks(_battery, WORLD, timeout_s=120)]


def _same_bits(tensors) -> bool:
    return all(torch.equal(t.view(torch.uint8), tensors[0].view(torch.uint8)) for t in tensors)


@pytest.mark.parametrize("name", list(quantizing()) + ["int8_bf16_avg", "few_blocks"])
def test_quantized_allreduce_gives_the_same_bits_on_every_rank(ranks, name):
    results = [rank[name][0] for rank in ranks]
    assert results[0].float().abs().sum() > 0
    assert _same_bits(results)


def _requant_bound(c, x: torch.Tensor, block: int) -> torch.Tensor:
    """Bound on requantizing any tensor whose blocks' absmax is at most that of x (per value)."""
    if isinstance(c, Identity):
        return torch.zeros_like(x)
    if isinstance(c, Cast):
        return x.abs() * UNIT_ROUNDOFF[c.target]
    n = x.numel()
    absmax = torch.cat([x.abs(), x.new_zeros(-n % block)]).view(-1, block).amax(1, keepdim=True)
    absmax = absmax.expand(-1, block).reshape(-1)[:n]
    if isinstance(c, SignQuantizer):
        return absmax
    reach = 1.0 if getattr(c, "stochastic", False) else 0.5
    if isinstance(c, IntQuantizer):
        return reach * absmax / c.qmax
    grid = torch.tensor(GRIDS[c.format])
    return reach * (grid[1:] - grid[:-1]).max() / grid[-1] * absmax


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "int8", "int4", "int4_sr", "fp4_e2m1", "fp4_e3m0", "sign"])
def test_quantized_allreduce_matches_the_fp64_sum_within_the_bound(ranks, name):
    c = quantizing()[name]
    inputs = [sample(SHAPE, torch.float32, r).reshape(-1) for r in range(WORLD)]
    reference = torch.stack(inputs).double().sum(0)
    first = sum(round_trip_bound(c, x) for x in inputs)  # each rank's chunks, compressed to be sent
    worst = (reference.abs() + first).float()
    bound = first + _requant_bound(c, worst, 64) + 4 * UNIT_ROUNDOFF[torch.float32] * sum(x.abs() for x in inputs)
    error = (ranks[0][name][0].reshape(-1).double() - reference).abs()
    assert (error <= bound * (1 + 1e-5) + 1e-30).all(), f"exceeds by {(error - bound).max().item():.3g}"


def test_quantized_allreduce_of_bf16_averages_within_the_bound(ranks):
    result, c, u = ranks[0]["int8_bf16_avg"][0], IntQuantizer(8, 64), 2.0 ** -8  # u: bf16 rounding
    inputs = [sample(SHAPE, torch.bfloat16, r).reshape(-1).float() for r in range(WORLD)]
    reference = torch.stack(inputs).double().mean(0).float()
    sent = sum(round_trip_bound(c, x) * (1 + u) + x.abs() * u for x in inputs) / WORLD  # decompressed to bf16
    reduced = sent + (reference.abs() + sent) * u  # the fp32 average rounded to bf16
    requantized = reduced + _requant_bound(c, reference.abs() + reduced, 64)
    bound = requantized + (reference.abs() + requantized) * u  # decompressed to bf16
    assert result.dtype == torch.bfloat16
    assert ((result.reshape(-1).float() - reference).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("name", list(quantizing()) + ["int8_bf16_avg", "few_blocks"])
def test_quantized_allreduce_counted_bytes_equal_expected_and_gloo_writes(ranks, name):
    c = quantizing().get(name, IntQuantizer(8, 64))
    shape, dtype = {"int8_bf16_avg": (SHAPE, torch.bfloat16), "few_blocks": ((100,), torch.float32)}.get(
        name, (SHAPE, torch.float32))
    for r, rank in enumerate(ranks):
        _, counted, written = rank[name]
        assert counted == written == expected_bytes_sent("quantized_allreduce", shape, dtype, WORLD, r, c)


def test_chunks_keep_blocks_whole_even_with_fewer_blocks_than_ranks():
    assert chunk_ranges(100, 3, 64) == [(0, 0), (0, 64), (64, 100)]
    assert chunk_ranges(1155, 3, 64) == [(0, 384), (384, 768), (768, 1155)]
    assert chunk_ranges(0, 2, 8) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_quantized_bytes_equal_the_textbook_formula_when_blocks_divide_evenly(world):
    n, c = world * 256 * 5, IntQuantizer(8, 256)
    per_value = c.payload_bytes(n, torch.float32) / n
    for r in range(world):
        assert expected_bytes_sent("quantized_allreduce", n, torch.float32, world, r, c) == \
            2 * (world - 1) / world * n * per_value
        assert expected_bytes_sent("allreduce", n, torch.float32, world, r) == 2 * (world - 1) / world * n * 4
        assert expected_bytes_sent("compressed_allgather", n, torch.float32, world, r, c) == \
            (world - 1) * c.payload_bytes(n, torch.float32)


def test_compressed_allgather_delivers_every_ranks_variable_size_payload(ranks):
    inner = IntQuantizer(8, 64)
    for r, rank in enumerate(ranks):
        gathered, counted, written = rank["zstd_gather"]
        for src, got in enumerate(gathered):
            x = sample((4000,), torch.float32, src)
            x[: 1000 * (src + 1)] = 0
            assert torch.equal(got, inner.decompress(inner.compress(x)))
        expected = expected_bytes_sent("compressed_allgather", (4000,), torch.float32, WORLD, r,
                                       Zstd(inner, 3), payload_nbytes=rank["zstd_nbytes"])
        assert counted == written == expected
    assert len({rank["zstd_nbytes"] for rank in ranks}) == WORLD  # the sizes really differed


def test_compressed_allgather_topk_sum_is_the_same_on_every_rank(ranks):
    results = [rank["topk_gather_sum"][0] for rank in ranks]
    assert _same_bits(results)
    reference = sum(TopK(0.1).decompress(TopK(0.1).compress(sample(SHAPE, torch.float32, r))) for r in range(WORLD))
    torch.testing.assert_close(results[0], reference, rtol=1e-6, atol=1e-6)
    for r, rank in enumerate(ranks):
        assert rank["topk_gather_sum"][1] == rank["topk_gather_sum"][2] == \
            expected_bytes_sent("compressed_allgather", SHAPE, torch.float32, WORLD, r, TopK(0.1))


def test_powersgd_allreduce_is_the_same_on_every_rank_and_exact_for_rank_r_sums(ranks):
    for i in range(2):
        results = [rank["powersgd"][0][i] for rank in ranks]
        assert _same_bits(results)
        reference = sum(_low_rank(r)[i] for r in range(WORLD))
        torch.testing.assert_close(results[0], reference, rtol=1e-4, atol=1e-4)
    shapes = [t.shape for t in _low_rank(0)]
    for r, rank in enumerate(ranks):
        expected = expected_bytes_sent("powersgd_allreduce", shapes, torch.float32, WORLD, r, PowerSGD(rank=2))
        assert rank["powersgd"][1] == rank["powersgd"][2] == expected
        assert expected == sum(wire.gloo_allreduce(4 * 2 * n, 4, WORLD, r).bytes_sent for n in (40 + 40, 30 + 12))


def test_async_collectives_return_what_the_sync_ones_do(ranks):
    for rank in ranks:
        quantized, gathered, low_rank = rank["async"]
        assert torch.equal(quantized, rank["int4"][0])
        assert torch.equal(gathered, rank["topk_gather_sum"][0])
        assert all(torch.equal(a, b) for a, b in zip(low_rank, rank["powersgd"][0]))


def test_nan_input_is_rejected_with_a_clear_error(ranks):
    assert all("has inf or nan values" in rank["nan_error"] for rank in ranks)


def test_unchunkable_or_variable_size_compressors_are_refused_by_quantized_allreduce():
    for c in (PowerSGD(), Zstd(IntQuantizer())):
        with pytest.raises(ValueError, match="must be chunkable with fixed-size payloads"):
            quantized_allreduce(None, torch.ones(4, 4), c)
    with pytest.raises(ValueError, match="must be powersgd"):
        powersgd_allreduce(None, [torch.ones(4, 4)], TopK())
    with pytest.raises(ValueError, match="PowerSGD compresses matrices"):
        powersgd_allreduce(None, [torch.ones(4)], PowerSGD())


def test_ratios_of_expected_bytes_match_the_compressors_nominal_ratios():
    n, world = 64 * 2 ** 20, 4
    plain = expected_bytes_sent("allreduce", n, torch.float32, world)
    int4 = expected_bytes_sent("quantized_allreduce", n, torch.float32, world, 0, IntQuantizer(4, 128))
    assert plain / int4 == pytest.approx(4 / (0.5 + 4 / 128))
    assert math.isclose(plain / expected_bytes_sent("quantized_allreduce", n, torch.float32, world, 0, Bf16()), 2)
