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
and process) pays back. If compiling fails (no C++ compiler), the eager path is used from then on,
with one warning. Both paths give the same bits (tests/test_kernels.py).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

FMAX = torch.finfo(torch.float32).max
_SETTINGS = {"compile": os.environ.get("RAYLANE_COMM_COMPILE", "1") != "0", "min_numel": 1 << 20}
_COMPILED: dict[str, Callable] = {}
_LOCK = threading.Lock()


def configure(compile: bool | None = None, min_numel: int | None = None) -> dict:
    """Set whether large tensors go through torch.compile'd kernels, and from which size; returns the settings."""
    if compile is not None:
        _SETTINGS["compile"] = bool(compile)
    if min_numel is not None:
        _SETTINGS["min_numel"] = int(min_numel)
    return dict(_SETTINGS)


def use_compiled(numel: int) -> bool:
    return _SETTINGS["compile"] and numel >= _SETTINGS["min_numel"]


def _call(name: str, numel: int, fused_args: tuple, eager: Callable[[], None]) -> None:
    """Run the compiled kernel `name` (compiled on first use) on fused_args, or `eager()`."""
    if use_compiled(numel):
        fn = _COMPILED.get(name)
        if fn is None:
            with _LOCK:
                fn = _COMPILED.setdefault(name, torch.compile(_FUSED[name], dynamic=False, fullgraph=True))
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


def _fp4_code(y, mids: list[float]):
    """Sign bit (8) plus the number of grid midpoints strictly below |y|, as floats."""
    mag = y.abs()
    code = torch.zeros_like(y)
    for i, m in enumerate(mids):
        code = torch.where(mag > m, float(i + 1), code)
    return code + (y < 0).to(torch.float32) * 8


def _fp4_encode_fused(x, gmax: float, mids: list[float], scales_out, codes_out) -> None:
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


_FUSED = {"int_encode": _int_encode_fused, "fp4_encode": _fp4_encode_fused, "int_decode": _int_decode_fused}


# -- eager versions: the same math, op by op into the given buffers ----------------------------
# `scratch` is an fp32 buffer and `iscratch` an int32 buffer of x's (or out's) size, owned by the caller.
def _pack_into(scratch: torch.Tensor, codes_out: torch.Tensor) -> None:
    """4-bit codes held as floats in scratch -> bytes (low nibble first); small integers, exact."""
    pairs = scratch.view(-1, 2)
    lo = pairs[:, 0]
    torch.add(lo, pairs[:, 1], alpha=16, out=lo)
    codes_out.copy_(lo)


def _int_encode_eager(x, qmax: float, noise, scales_out, codes_out, bits: int, scratch) -> None:
    torch.div(block_absmax(x), qmax, out=scales_out)
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


def _fp4_search(mids: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundaries and a 16-entry table so that code = table[bucketize(y, boundaries)] (one search).

    y >= 0 (and -0.0): boundaries below it are the 8 negative ones, so index 8 + #(mids < y), code = that - 8.
    y < 0: index #(b < y) over b = the float just below -m (so that b < y <=> -m <= y), code = 15 - index.
    """
    below = [torch.nextafter(torch.tensor(-m), torch.tensor(-float("inf"))).item() for m in reversed(mids)]
    bounds = torch.tensor(below + [-torch.finfo(torch.float32).smallest_normal * 2.0 ** -23] + list(mids))
    table = torch.tensor([15 - i for i in range(8)] + [i for i in range(8)], dtype=torch.float32)
    return bounds.float(), table


def _fp4_encode_eager(x, gmax: float, mids: list[float], scales_out, codes_out, scratch, iscratch) -> None:
    torch.div(block_absmax(x), gmax, out=scales_out)
    torch.mul(x, inverse(scales_out).unsqueeze(1), out=scratch)
    bounds, table = _SEARCH.get(tuple(mids)) or _SEARCH.setdefault(tuple(mids), _fp4_search(mids))
    idx = iscratch.view(-1)
    torch.bucketize(scratch.view(-1), bounds.to(x.device), out_int32=True, out=idx)
    torch.index_select(table.to(x.device), 0, idx, out=scratch.view(-1))
    _pack_into(scratch, codes_out)


def _lut_decode_eager(codes, scales, table256, out, accumulate: bool, scratch, iscratch) -> None:
    """Packed nibbles through a 256-entry table of value pairs, times the block scales."""
    idx = iscratch.view(-1)[:codes.numel()]
    idx.copy_(codes)
    torch.index_select(table256.to(codes.device), 0, idx, out=scratch.view(-1, 2))
    _scale_into(scratch.view(out.shape), scales, out, accumulate)


def _scale_into(q, scales, out, accumulate: bool) -> None:
    if accumulate:
        out.add_(q.mul_(scales.unsqueeze(1)))
    else:
        torch.mul(q, scales.unsqueeze(1), out=out)


def _int_decode_eager(codes, scales, bits: int, out, accumulate: bool, scratch, iscratch) -> None:
    if bits == 4:
        return _lut_decode_eager(codes, scales, _INT4_TABLE, out, accumulate, scratch, iscratch)
    q = codes.view(torch.int8).view(out.shape)
    if accumulate:
        torch.mul(q, scales.unsqueeze(1), out=scratch.view(out.shape))
        out.add_(scratch.view(out.shape))
    else:
        torch.mul(q, scales.unsqueeze(1), out=out)


def _pair_table(values: list[float]) -> torch.Tensor:
    """[256, 2]: the two 4-bit codes of each byte (low nibble first) mapped to their values."""
    v = torch.tensor(values, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([v[b & 15], v[b >> 4]], dim=1).contiguous()


_INT4_TABLE = _pair_table([float(i - 8) for i in range(16)])
_PAIR_TABLES: dict[tuple[float, ...], torch.Tensor] = {}
_SEARCH: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor]] = {}


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
    """Scales (absmax / grid max) and 4-bit codes (sign bit 8 + nearest grid index, lower on ties), packed."""
    mids, gmax = [(a + b) / 2 for a, b in zip(grid, grid[1:])], float(grid[-1])
    _call("fp4_encode", x.numel(), (x, gmax, mids, scales_out, codes_out),
          lambda: _fp4_encode_eager(x, gmax, mids, scales_out, codes_out, _t(scratch).view(x.shape), _t(iscratch)))


def decode_int(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor, accumulate: bool,
               scratch: torch.Tensor, iscratch: torch.Tensor) -> None:
    _call("int_decode", out.numel(), (codes, scales, bits, out, accumulate),
          lambda: _int_decode_eager(codes, scales, bits, out, accumulate, _t(scratch), _t(iscratch)))


def decode_fp4(codes: torch.Tensor, scales: torch.Tensor, grid: list[float], out: torch.Tensor, accumulate: bool,
               scratch: torch.Tensor, iscratch: torch.Tensor) -> None:
    key = tuple(grid)
    if key not in _PAIR_TABLES:
        values = list(grid) + [-v for v in grid]
        _PAIR_TABLES[key] = _pair_table(values)
    # Always the eager table path: on CPU it beats inductor's scalar gathers (benchmarks/results/comm.md).
    _lut_decode_eager(codes, scales, _PAIR_TABLES[key], out, accumulate, _t(scratch), _t(iscratch))
