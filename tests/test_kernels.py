"""Quantization kernels (raylane.comm.kernels): the eager and the torch.compile'd path give the bits of
the reference quantizers (tests/_reference_comm, the code before the speed work), on awkward values:
all-zero blocks, signed zeros, exact grid midpoints, tiny and huge scales."""

import pytest
import torch

from raylane.comm import kernels
from tests._reference_comm.quantizers import FP4Quantizer, IntQuantizer

pytestmark = pytest.mark.timeout(600)

BLOCK = 64


def awkward(blocks: int, seed: int) -> torch.Tensor:
    """Heavy-tailed values, plus blocks of zeros, -0.0, exact fp4 midpoints and denormal-scale blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(blocks, BLOCK, generator=g) * torch.randn(blocks, BLOCK, generator=g).exp() * 3
    x[0] = 0.0
    x[1] = -0.0
    x[2, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5,
                              -3.5, -5.0, -0.0])  # scaled by 1: midpoints of e2m1
    x[2, 16:] = 0.0
    x[3] = x[3] * 1e-40  # scale's reciprocal overflows: capped
    x[4, :8] = torch.tensor([2.0 ** e for e in range(-7, 1)])  # e3m0 grid and midpoints
    x[4, 8:] = -x[4, :8].repeat(7)
    return x


def _int_case(bits: int, x: torch.Tensor, noise: torch.Tensor | None):
    n, nb = x.numel(), x.shape[0]
    scales, codes = torch.empty(nb), torch.empty(n if bits == 8 else n // 2, dtype=torch.uint8)
    kernels.encode_int(x, 2 ** (bits - 1) - 1, bits, noise, scales,
                       codes.view(torch.int8) if bits == 8 else codes, torch.empty(n), torch.empty(n, dtype=torch.int32))
    return scales, codes


def _decode(kind, codes, scales, n, nb, accumulate_onto=None):
    out = torch.zeros(nb, BLOCK) if accumulate_onto is None else accumulate_onto.clone()
    args = (out, accumulate_onto is not None, torch.empty(n), torch.empty(n, dtype=torch.int32))
    if isinstance(kind, int):
        kernels.decode_int(codes, scales, kind, *args)
    else:
        kernels.decode_fp4(codes, scales, kind, *args)
    return out


def _check_all(compiled: bool) -> None:
    kernels.configure(compile=compiled, min_numel=0)
    try:
        x = awkward(40, 0)
        n, nb = x.numel(), x.shape[0]
        base = torch.randn(nb, BLOCK, generator=torch.Generator().manual_seed(5))
        for bits in (8, 4):
            ref = IntQuantizer(bits, BLOCK)
            parts = ref.compress(x.reshape(-1)).parts
            scales, codes = _int_case(bits, x, None)
            assert torch.equal(scales.view(torch.int32), parts["scales"].view(torch.int32)), bits
            assert torch.equal(codes, parts["codes"]), bits
            want = ref.decompress(ref.compress(x.reshape(-1))).view(nb, BLOCK)
            assert torch.equal(_decode(bits, codes, scales, n, nb).view(torch.int32), want.view(torch.int32))
            summed = _decode(bits, codes, scales, n, nb, accumulate_onto=base)
            assert torch.equal(summed.view(torch.int32), (base + want).view(torch.int32))
            sr = IntQuantizer(bits, BLOCK, stochastic=True, seed=3)
            noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
            scales, codes = _int_case(bits, x, noise)
            assert torch.equal(codes, sr.compress(x.reshape(-1)).parts["codes"]), f"stochastic int{bits}"
        for fmt in ("e2m1", "e3m0"):
            ref = FP4Quantizer(fmt, BLOCK)
            parts = ref.compress(x.reshape(-1)).parts
            scales, codes = torch.empty(nb), torch.empty(n // 2, dtype=torch.uint8)
            kernels.encode_fp4(x, ref.grid, scales, codes, torch.empty(n), torch.empty(n, dtype=torch.int32))
            assert torch.equal(scales.view(torch.int32), parts["scales"].view(torch.int32)), fmt
            assert torch.equal(codes, parts["codes"]), fmt
            want = ref.decompress(ref.compress(x.reshape(-1))).view(nb, BLOCK)
            assert torch.equal(_decode(ref.grid, codes, scales, n, nb).view(torch.int32), want.view(torch.int32))
            summed = _decode(ref.grid, codes, scales, n, nb, accumulate_onto=base)
            assert torch.equal(summed.view(torch.int32), (base + want).view(torch.int32))
    finally:
        kernels.configure(compile=True, min_numel=1 << 20)


def test_eager_kernels_give_the_reference_quantizers_bits():
    _check_all(compiled=False)


def test_compiled_kernels_give_the_reference_quantizers_bits():
    """Compiles each kernel once (seconds each on 2 cores; inductor's disk cache makes reruns fast)."""
    _check_all(compiled=True)
    assert kernels.configure()["compile"], "torch.compile failed and fell back to eager"


def test_nan_or_inf_in_a_block_gives_a_non_finite_scale():
    x = awkward(8, 1)
    x[5, 3], x[6, 0] = float("nan"), -float("inf")
    scales, _ = _int_case(8, x, None)
    assert scales[5].isnan() and scales[6].isinf() and scales[[0, 1, 2, 3, 4, 7]].isfinite().all()


def test_compression_config_compile_switch_sets_the_kernel_path():
    from raylane.comm.compression_config import CompressionConfig

    try:
        CompressionConfig("int", bits=8, compile=False).build()
        assert not kernels.use_compiled(1 << 24)
        CompressionConfig("fp4", compile=True).build()
        assert kernels.use_compiled(1 << 24) and not kernels.use_compiled(1000)
        with pytest.raises(ValueError, match=r"compression.compile='yes': must be one of \[None, False, True\]"):
            CompressionConfig("int", compile="yes").build()
    finally:
        kernels.configure(compile=True)


@pytest.mark.parametrize("compiled", [False, True])
def test_fp4_code_table_puts_values_at_and_beside_every_midpoint_where_the_reference_does(compiled):
    """The bits-keyed fp4 code table against the reference's midpoint comparisons: each midpoint, the
    floats just below and above it, both signs, signed zeros, denormals, and values past the grid's end
    (blocks scaled by exactly 1: each holds the grid maximum)."""
    kernels.configure(compile=compiled, min_numel=0)
    try:
        for fmt in ("e2m1", "e3m0"):
            ref = FP4Quantizer(fmt, BLOCK)
            mids = torch.tensor([(a + b) / 2 for a, b in zip(ref.grid, ref.grid[1:])])
            near = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)),
                              torch.nextafter(mids, torch.full_like(mids, 10.0)),
                              torch.tensor([0.0, -0.0, 1e-45, 1e-40, ref.grid[-1] * (1 - 2 ** -24)])])
            values = torch.cat([near, -near])
            body = torch.cat([values, torch.zeros(-values.numel() % (BLOCK - 1))]).view(-1, BLOCK - 1)
            rows = torch.cat([torch.full((body.shape[0], 1), float(ref.grid[-1])), body], dim=1)
            x, n, nb = rows.reshape(-1), rows.numel(), rows.shape[0]
            assert torch.equal(x[1:values.numel() + 1], values)
            scales, codes = torch.empty(nb), torch.empty(n // 2, dtype=torch.uint8)
            kernels.encode_fp4(rows, ref.grid, scales, codes, torch.empty(n), torch.empty(n, dtype=torch.int32))
            parts = ref.compress(x).parts
            assert torch.equal(scales, torch.ones(nb)) and torch.equal(codes, parts["codes"]), fmt
    finally:
        kernels.configure(compile=True, min_numel=1 << 20)


def test_compiled_fp4_midpoint_compares_give_the_table_codes_for_random_bit_patterns():
    """The compiled encode counts midpoints below |y| (`kernels._fp4_code`), the eager one looks codes up
    by bits: same bytes for 64,512 values drawn uniformly over the fp32 bit patterns of [-8, 8] (denormals,
    every binade of both grids, both signs), in blocks scaled by exactly 1."""
    g, count = torch.Generator().manual_seed(11), 1024 * (BLOCK - 1)
    bits = torch.randint(0, 0x41000001, (count,), generator=g, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32) * (torch.rand(count, generator=g) < 0.5).float().mul(2).sub(1)
    try:
        for fmt in ("e2m1", "e3m0"):
            ref = FP4Quantizer(fmt, BLOCK)
            body = values.clamp(-ref.grid[-1], ref.grid[-1]).view(-1, BLOCK - 1)
            rows = torch.cat([torch.full((body.shape[0], 1), float(ref.grid[-1])), body], dim=1)
            n, nb = rows.numel(), rows.shape[0]
            got = {}
            for compiled in (False, True):
                kernels.configure(compile=compiled, min_numel=0)
                scales, codes = torch.empty(nb), torch.empty(n // 2, dtype=torch.uint8)
                kernels.encode_fp4(rows, ref.grid, scales, codes, torch.empty(n), torch.empty(n, dtype=torch.int32))
                assert torch.equal(scales, torch.ones(nb)), fmt
                got[compiled] = codes
            assert torch.equal(got[True], got[False]), fmt
            assert torch.equal(got[True], ref.compress(rows.reshape(-1)).parts["codes"]), fmt
        assert kernels.configure()["compile"], "torch.compile failed and fell back to eager"
    finally:
        kernels.configure(compile=True, min_numel=1 << 20)


@pytest.mark.parametrize("compiled", [False, True])
def test_fp4_and_int4_decode_of_every_byte_gives_table_value_times_scale_bits(compiled):
    """Every packed byte, under scales that give denormals, overflow to inf, zeros and signed zeros,
    decodes (and accumulates) to value[nibble] * scale bit for bit; 772 bytes leave a vector-loop tail.
    Compiled fp4 builds the values' bits from the nibbles (`kernels.fp4_bits`), eager uses the pair table."""
    kernels.configure(compile=compiled, min_numel=0)
    try:
        codes = torch.cat([torch.arange(256).repeat(3), torch.tensor([0, 8, 128, 255])]).to(torch.uint8)
        nb = codes.numel() * 2 // 8
        pick = torch.tensor([1.0, 0.7, 1e-38, 3e38, 2.0 ** -130, 0.0, 123.456, 1e-45])
        scales = pick[torch.arange(nb) % pick.numel()]
        base = torch.randn(nb, 8, generator=torch.Generator().manual_seed(7))
        nibbles = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1).long()
        for grid in (FP4Quantizer("e2m1", 8).grid, FP4Quantizer("e3m0", 8).grid, 4):
            values = torch.arange(16.0) - 8 if grid == 4 else torch.tensor(grid + [-v for v in grid])
            want = (values[nibbles].view(nb, 8) * scales.unsqueeze(1)).view(torch.int32)
            got = _decode_rows(grid, codes, scales, torch.zeros(nb, 8), False)
            assert torch.equal(got.view(torch.int32), want), grid
            summed = _decode_rows(grid, codes, scales, base.clone(), True)
            assert torch.equal(summed.view(torch.int32), (base + want.view(torch.float32)).view(torch.int32)), grid
        assert kernels.fp4_bits(FP4Quantizer("e2m1").grid) == (2, 252, 22, 126 << 23)
        assert kernels.fp4_bits(FP4Quantizer("e3m0").grid) == (1, 120, 23, 0)
        assert kernels.fp4_bits([float(i) for i in range(8)]) is None
        odd = [float(i) for i in range(8)]  # no bit formula: the pair table serves it on both paths
        got = _decode_rows(odd, codes, scales, torch.zeros(nb, 8), False)
        assert torch.equal(got.view(-1), torch.tensor(odd + [-v for v in odd])[nibbles] * scales.repeat_interleave(8))
        if compiled:
            assert kernels.configure()["compile"], "torch.compile failed and fell back to eager"
    finally:
        kernels.configure(compile=True, min_numel=1 << 20)


def _decode_rows(kind, codes, scales, out, accumulate):
    n = out.numel()
    args = (out, accumulate, torch.empty(n), torch.empty(n, dtype=torch.int32))
    (kernels.decode_int if isinstance(kind, int) else kernels.decode_fp4)(codes, scales, kind, *args)
    return out
