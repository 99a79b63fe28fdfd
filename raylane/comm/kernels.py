"""Encode and decode kernels of the blockwise int / fp4 quantizers, written into given buffers.

Contract: `x` is a [blocks, block] fp32 view of whole blocks (the caller pads a partial last block);
kernels write scales and packed codes into the caller's buffers (`encode_*`), or the reconstruction
into `out` (`decode_*`, which with `accumulate` adds it to `out` instead: out + (q * scale), two
roundings, as the reference path did). The math is `raylane.comm.quantizers`' bit for bit; block
scales come from amax/amin (one reduction), and a NaN or inf in a block gives a non-finite scale,
which the caller checks (on the small scales tensor) before anything is sent.

Each kernel runs either as eager torch ops into the given buffers (no tensor allocated at the
data's size; `scratch` is a caller-owned fp32 buffer of x's size) or through `torch.compile`
(inductor fuses each into one or two passes). The compiled path is used when `use_compiled(numel)`:
switched on by `configure(compile=True)` (the default; env RAYLANE_COMM_COMPILE=0 turns it off) and
only for tensors of at least `min_numel` values, where the one-time compile cost (seconds per kernel
and process) pays back. On GPUs the eager kernels run unless `configure(compile_gpu=True)` (env
RAYLANE_COMM_COMPILE_GPU=1): Triton's fp32 division and fused multiply-adds are not the CPU's bits.
Eager divisions by a constant go through a device tensor (`quant.div_scalar`), so that eager GPU
results equal the CPU's. If compiling fails (no C++ compiler), the eager path is used from then on,
with one warning. Both paths give the same bits (tests/test_kernels.py).
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
from collections.abc import Callable

import torch

FMAX = torch.finfo(torch.float32).max
_SETTINGS = {"compile": os.environ.get("RAYLANE_COMM_COMPILE", "1") != "0", "min_numel": 1 << 20,
             "compile_gpu": os.environ.get("RAYLANE_COMM_COMPILE_GPU", "0") == "1"}
_COMPILED: dict[str, Callable] = {}
_LOCK = threading.Lock()


def configure(compile: bool | None = None, min_numel: int | None = None, compile_gpu: bool | None = None) -> dict:
    """Set whether large tensors go through torch.compile'd kernels, and from which size; returns the settings."""
    if compile_gpu is not None:
        _SETTINGS["compile_gpu"] = bool(compile_gpu)
    if compile is not None:
        _SETTINGS["compile"] = bool(compile)
    if min_numel is not None:
        _SETTINGS["min_numel"] = int(min_numel)
    return dict(_SETTINGS)


def use_compiled(numel: int, device: torch.device | str = "cpu") -> bool:
    """Compiled for CPU tensors; on other devices only with `compile_gpu` (Triton's fp32 division and
    fused multiply-adds differ from eager in the last bit: benchmarks/gpu_check.py records it)."""
    on_device = torch.device(device).type == "cpu" or _SETTINGS["compile_gpu"]
    return _SETTINGS["compile"] and on_device and numel >= _SETTINGS["min_numel"]


def min_compiled_numel() -> int:
    """The fewest values a kernel call needs to take the compiled path (1 when compiling is off)."""
    return _SETTINGS["min_numel"] if _SETTINGS["compile"] else 1


def _call(name: str, numel: int, fused_args: tuple, eager: Callable[[], None]) -> None:
    """Run the compiled kernel `name` (compiled on first use) on fused_args, or `eager()`."""
    if use_compiled(numel, fused_args[0].device):
        fn = _COMPILED.get(name)
        if fn is None:
            with _LOCK:
                fn = _COMPILED.setdefault(name, torch.compile(_FUSED[name], dynamic=False, fullgraph=True,
                                                              options=_options(name)))
        for a in fused_args:  # sizes vary along dim 0 only; a static block size keeps the loops vectorized
            if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        try:
            return fn(*fused_args)
        except Exception as err:  # noqa: BLE001 - no compiler, unsupported platform: fall back, once, loudly
            _SETTINGS["compile"] = False
            warnings.warn(f"raylane.comm.kernels: torch.compile failed ({type(err).__name__}: {err}); "
                          "using the eager kernels from now on", RuntimeWarning, stacklevel=3)
    eager()


# -- shared math -------------------------------------------------------------------------------
def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """|x| max per row, from amax and amin (+0.0 for an all-zero row; NaN propagates)."""
    amin, amax = torch.aminmax(x, dim=1)
    return torch.maximum(amax, amin.neg_()).abs_()


def inverse(scales: torch.Tensor) -> torch.Tensor:
    """1 / scale (0 where the scale is 0), capped at the largest float (as `quant.scale_rows`)."""
    return torch.where(scales > 0, 1.0 / scales, 0.0).clamp_(max=FMAX)


# -- fused (compiled) versions: functional math, copied into the outputs -----------------------
def _scaled_halves(x, gmax: float):
    """Block scales (absmax / gmax) and x * 1/scale split into even and odd columns, so that two 4-bit
    codes pack into one byte without a strided re-read of a materialised code tensor."""
    amax, amin = x.amax(dim=1), x.amin(dim=1)
    scales = torch.maximum(amax, -amin).abs() / gmax
    inv = torch.where(scales > 0, 1.0 / scales, 0.0).clamp(max=FMAX).unsqueeze(1)
    return scales, x[:, 0::2] * inv, x[:, 1::2] * inv


def _int_encode_fused(x, qmax: float, noise, scales_out, codes_out, bits: int) -> None:
    def rounded(y, noise):
        y = (y + noise).floor() if noise is not None else y.round()
        return y.clamp(-qmax, qmax)
    if bits == 8:
        amax, amin = x.amax(dim=1), x.amin(dim=1)
        scales = torch.maximum(amax, -amin).abs() / qmax
        inv = torch.where(scales > 0, 1.0 / scales, 0.0).clamp(max=FMAX)
        scales_out.copy_(scales)
        codes_out.copy_(rounded(x * inv.unsqueeze(1), noise).to(torch.int8).reshape(-1))
        return
    scales, even, odd = _scaled_halves(x, qmax)
    lo = rounded(even, None if noise is None else noise[:, 0::2]) + 8
    hi = rounded(odd, None if noise is None else noise[:, 1::2]) + 8
    scales_out.copy_(scales)
    codes_out.copy_((lo + hi * 16).to(torch.uint8).reshape(-1))


def _fp4_code(y, mids: tuple[float, ...]):
    """fp4 code of each scaled value (int32): 8 for y < 0 (not for -0.0) plus the number of the 7 sorted
    grid midpoints strictly below |y| (a tie goes to the lower code), the reference's rule. Counted by
    a binary search, 3 compares against thresholds picked by blends, all of which vectorize (a code
    table keyed on the bits, as the eager path uses, compiles to a scalar gather; 7 compares summed
    cost ~20% more here)."""
    a, m = y.abs(), mids
    b2 = a > m[3]
    b1 = a > torch.where(b2, m[5], m[1])
    b0 = a > torch.where(b2, torch.where(b1, m[6], m[4]), torch.where(b1, m[2], m[0]))
    i32 = torch.int32
    return (y < 0).to(i32) * 8 + b2.to(i32) * 4 + b1.to(i32) * 2 + b0.to(i32)


def _fp4_encode_fused(x, gmax: float, mids: tuple[float, ...], scales_out, codes_out) -> None:
    scales, even, odd = _scaled_halves(x, gmax)
    scales_out.copy_(scales)
    codes_out.copy_((_fp4_code(even, mids) + _fp4_code(odd, mids) * 16).to(torch.uint8).reshape(-1))


def _int_decode_fused(codes, scales, bits: int, out, accumulate: bool) -> None:
    if bits == 8:
        q = codes.view(torch.int8).to(torch.float32)
    else:
        q = torch.stack([(codes & 15), (codes >> 4)], dim=1).reshape(-1).to(torch.float32) - 8
    y = q.view(out.shape) * scales.unsqueeze(1)
    out.copy_(out + y if accumulate else y)


def _fp4_pairs_fused(codes, t: int, a: int, s: int, b: int, dst) -> None:
    """Each byte of packed fp4 codes -> the fp32 bits of its two values as one int64 (low nibble's value
    in the low half), computed in both halves at once (`fp4_bits`); contiguous loads and stores only."""
    ones, lo3 = 0x0000000100000001, 0x0000000700000007
    c = codes.to(torch.int32).to(torch.int64)
    x = (c & 15) | ((c >> 4) << 32)  # one nibble per 32-bit half
    mag = x & lo3
    big = (((mag + (8 - t) * ones) >> 3) & ones) * 0xFFFFFFFF  # all ones in a half where mag >= t
    small = ((mag & ((t - 1) * ones)) * b) & ~big
    dst.copy_((((mag + a * ones) << s) & big) | small | ((x & (8 * ones)) << 28))


def _scale_fused(q, scales, out, accumulate: bool) -> None:
    y = q * scales.unsqueeze(1)
    out.copy_(out + y if accumulate else y)


_FUSED = {"int_encode": _int_encode_fused, "fp4_encode": _fp4_encode_fused, "int_decode": _int_decode_fused,
          "fp4_pairs": _fp4_pairs_fused, "scale": _scale_fused}
# fp4 encode's ~80 pointwise ops per output byte exceed inductor's CPU threshold (50) above which it
# writes intermediates (each nibble's code, as fp32 at x's size) to memory and packs them in a third
# pass; with it raised the codes stay in registers: the amax/amin pass plus one encode pass over x.
_INDUCTOR_OPTIONS = {"fp4_encode": {"realize_cpu_opcount_threshold": 400}}


def _options(name: str) -> dict | None:
    """Inductor options of kernel `name` that this torch knows (an unknown one would fail the compile)."""
    from torch._inductor import config

    known = {k: v for k, v in _INDUCTOR_OPTIONS.get(name, {}).items() if hasattr(config, k)}
    return known or None


# -- eager versions: the same math, op by op into the given buffers ----------------------------
# `scratch` is an fp32 buffer and `iscratch` an int32 buffer of x's (or out's) size, owned by the caller.
def _pack_into(scratch: torch.Tensor, codes_out: torch.Tensor) -> None:
    """4-bit codes held as floats in scratch -> bytes (low nibble first); small integers, exact."""
    pairs = scratch.view(-1, 2)
    lo = pairs[:, 0]
    torch.add(lo, pairs[:, 1], alpha=16, out=lo)
    codes_out.copy_(lo)


def _divisor(d: float, like: torch.Tensor) -> float | torch.Tensor:
    """d as a divisor that divides exactly on like's device (see `quant.div_scalar`)."""
    return d if like.device.type == "cpu" else torch.tensor(d, dtype=like.dtype, device=like.device)


def _int_encode_eager(x, qmax: float, noise, scales_out, codes_out, bits: int, scratch) -> None:
    torch.div(block_absmax(x), _divisor(qmax, x), out=scales_out)
    torch.mul(x, inverse(scales_out).unsqueeze(1), out=scratch)
    if noise is None:
        scratch.round_()
    else:
        scratch.add_(noise).floor_()
    scratch.clamp_(-qmax, qmax)
    if bits == 8:
        codes_out.view(scratch.shape).copy_(scratch)
    else:
        _pack_into(scratch.add_(8), codes_out)


def _bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def fp4_table(mids: list[float]) -> tuple[torch.Tensor, int, int]:
    """(table, shift, mask): code = table[((bits(y) - 1) >> shift) & mask], bits(y) y's fp32 bits as int32.

    Code = sign bit (8, for y < 0) + the number of grid midpoints strictly below |y|. Every midpoint
    is a float whose low `shift` bits are 0, so within one key (bits - 1) >> shift all values lie on
    the same side of every midpoint: a value equal to a midpoint has bits - 1 just below it, hence the
    lower code (ties go down). The -1 sends +0.0 to the last key and -0.0 to the last positive one,
    both given code 0 (with NaNs, which never get this far: their block's scale is not finite).
    """
    shift = min(23, *[(_bits(m) & -_bits(m)).bit_length() - 1 for m in mids if m > 0])
    if shift < 16:
        raise ValueError(f"fp4 grid midpoints {mids} need a table of 2^{32 - shift} entries")
    half = 1 << (31 - shift)
    mags = [sum(1 for m in mids if _from_bits((k + 1) << shift) > m) for k in range(half)]
    mags[half - 1] = 0
    table = mags + [c + 8 for c in mags]
    table[-1] = 0
    return torch.tensor(table, dtype=torch.float32), shift, 2 * half - 1


def _fp4_encode_eager(x, gmax: float, table, shift: int, mask: int, scales_out, codes_out, scratch,
                      iscratch) -> None:
    torch.div(block_absmax(x), _divisor(gmax, x), out=scales_out)
    torch.mul(x, inverse(scales_out).unsqueeze(1), out=scratch)
    keys = iscratch.view(-1)
    torch.sub(scratch.view(-1).view(torch.int32), 1, out=keys)
    keys.bitwise_right_shift_(shift).bitwise_and_(mask)
    torch.index_select(table, 0, keys, out=scratch.view(-1))
    _pack_into(scratch, codes_out)


def _lut_decode_eager(codes, scales, table256, out, accumulate: bool, scratch, iscratch) -> None:
    """Packed nibbles through a 256-entry table of value pairs, times the block scales. The [256, 2]
    fp32 table is gathered as 256 int64s (each the bits of one pair, low nibble's value first): one
    8-byte gather per byte, written straight into `out` (or `scratch`, to accumulate), same bits."""
    idx = iscratch.view(-1)[:codes.numel()]
    idx.copy_(codes)
    q = out if not accumulate and out.is_contiguous() else scratch.view(out.shape)
    torch.index_select(table256.to(codes.device).view(torch.int64).view(-1), 0, idx,
                       out=q.view(-1).view(torch.int64))
    if q is out:
        out.mul_(scales.unsqueeze(1))
    else:
        _scale_into(q, scales, out, accumulate)


def _scale_into(q, scales, out, accumulate: bool) -> None:
    if accumulate:
        out.add_(q.mul_(scales.unsqueeze(1)))
    else:
        torch.mul(q, scales.unsqueeze(1), out=out)


def _int_decode_eager(codes, scales, bits: int, out, accumulate: bool, scratch, iscratch) -> None:
    if bits == 4:
        return _lut_decode_eager(codes, scales, _INT4_TABLE, out, accumulate, scratch, iscratch)
    q = scratch.view(out.shape)
    q.copy_(codes.view(torch.int8).view(out.shape))  # int8 -> fp32 in the scratch, not a new tensor
    _scale_into(q, scales, out, accumulate)


def _pair_table(values: list[float]) -> torch.Tensor:
    """[256, 2]: the two 4-bit codes of each byte (low nibble first) mapped to their values."""
    v = torch.tensor(values, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([v[b & 15], v[b >> 4]], dim=1).contiguous()


_INT4_TABLE = _pair_table([float(i - 8) for i in range(16)])
_PAIR_TABLES: dict[tuple[float, ...], torch.Tensor] = {}
_FP4_TABLES: dict[tuple[tuple[float, ...], str], tuple[torch.Tensor, int, int]] = {}


# -- entry points: x / out are [blocks, block] fp32; scratch (fp32) and iscratch (int32), as large,
# are tensors or callables that return them (called only if the eager path runs).
def _t(s):
    return s() if callable(s) else s


def encode_int(x: torch.Tensor, qmax: int, bits: int, noise: torch.Tensor | None, scales_out: torch.Tensor,
               codes_out: torch.Tensor, scratch: torch.Tensor, iscratch: torch.Tensor) -> None:
    """Scales (absmax / qmax) and int8 codes, or int4 codes + 8 packed two per byte."""
    q = float(qmax)
    _call("int_encode", x.numel(), (x, q, noise, scales_out, codes_out, bits),
          lambda: _int_encode_eager(x, q, noise, scales_out, codes_out, bits, _t(scratch).view(x.shape)))


def encode_fp4(x: torch.Tensor, grid: list[float], scales_out: torch.Tensor, codes_out: torch.Tensor,
               scratch: torch.Tensor, iscratch: torch.Tensor) -> None:
    """Scales (absmax / grid max) and 4-bit codes (sign bit 8 + nearest grid index, lower on ties), packed;
    compiled: codes from compares against the grid midpoints (`_fp4_code`); eager: looked up by the
    scaled value's bits (`fp4_table`). Same codes (tests/test_kernels.py)."""
    mids, gmax = tuple((a + b) / 2 for a, b in zip(grid, grid[1:])), float(grid[-1])
    if len(mids) != 7 or list(mids) != sorted(mids):
        raise ValueError(f"fp4 grid {grid}: must be 8 ascending values (3-bit magnitudes)")

    def eager() -> None:
        key = (mids, str(x.device))
        if key not in _FP4_TABLES:
            table, shift, mask = fp4_table(list(mids))
            _FP4_TABLES[key] = (table.to(x.device), shift, mask)
        table, shift, mask = _FP4_TABLES[key]
        _fp4_encode_eager(x, gmax, table, shift, mask, scales_out, codes_out, _t(scratch).view(x.shape), _t(iscratch))

    _call("fp4_encode", x.numel(), (x, gmax, mids, scales_out, codes_out), eager)


def decode_int(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor, accumulate: bool,
               scratch: torch.Tensor, iscratch: torch.Tensor) -> None:
    _call("int_decode", out.numel(), (codes, scales, bits, out, accumulate),
          lambda: _int_decode_eager(codes, scales, bits, out, accumulate, _t(scratch), _t(iscratch)))


def fp4_bits(grid: list[float]) -> tuple[int, int, int, int] | None:
    """(t, a, s, b): the fp32 bits of grid value m (m = 0..7) are (m + a) << s for m >= t, else m * b
    (e2m1: (2, 252, 22, 126 << 23); e3m0: (1, 120, 23, 0)); None for a grid that fits neither.
    Checked against the grid's own values, signed zeros included, for all 256 bytes."""
    want = _pair_table(list(grid) + [-v for v in grid]).view(torch.int64).view(-1)
    for p in ((2, 252, 22, 126 << 23), (1, 120, 23, 0)):
        got = torch.empty(256, dtype=torch.int64)
        _fp4_pairs_fused(torch.arange(256).to(torch.uint8), *p, got)
        if torch.equal(got, want):
            return p
    return None


_FP4_BITS: dict[tuple[float, ...], tuple[int, int, int, int] | None] = {}


def decode_fp4(codes: torch.Tensor, scales: torch.Tensor, grid: list[float], out: torch.Tensor, accumulate: bool,
               scratch: torch.Tensor, iscratch: torch.Tensor) -> None:
    """Compiled: the values' bits built from the nibbles (`fp4_bits`) into `out` (or the scratch, to
    accumulate), then times the scales in a second pass; eager: the pair table (`_lut_decode_eager`)."""
    key = tuple(grid)
    if key not in _FP4_BITS:  # the table first: a thread that sees the key finds both
        _PAIR_TABLES[key] = _pair_table(list(grid) + [-v for v in grid])
        _FP4_BITS[key] = fp4_bits(grid)
    params = _FP4_BITS[key]
    n = out.numel()
    if params is not None and use_compiled(n, out.device):
        q = out if not accumulate and out.is_contiguous() else _t(scratch).view(out.shape)
        _call("fp4_pairs", n, (codes, *params, q.view(-1).view(torch.int64)), lambda: None)
        if use_compiled(n, out.device):  # still compiled: pairs written
            _call("scale", n, (q, scales, out, accumulate), lambda: _scale_into(q, scales, out, accumulate))
            return
    _lut_decode_eager(codes, scales, _PAIR_TABLES[key], out, accumulate, _t(scratch), _t(iscratch))
