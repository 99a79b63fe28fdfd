"""The compression levels L-GreCo chooses among, per layer: what each sends and how much it errs.

A level is a string: "none" (full precision), "powersgd:<rank>", "topk:<ratio>", or a quantizer
("bf16", "fp16", "int8", "int4", "int2", "fp4_e2m1", "fp4_e3m0", "sign"). Its family says which collective
carries it: quant and none a quantized allreduce (alltoall reduce-scatter + allgather of payloads),
topk a compressed allgather, powersgd a PowerSGD allreduce (two allreduces of fp32 factors).

- `wire_bytes(level, shape, world)`: the payload bytes all ranks together send for one sync of a
  layer of that shape (the comm layer's formulas, which its Communicator counts with).
- `in_range(level, default, shape, world, bounds)`: whether a level is a candidate for a layer, its
  bytes within [gamma, beta] x the default level's (the paper's ranks r/2..2r around the default).
- `errors(levels, acc)`: ||C(acc) - acc||_2 per level for one layer's accumulated gradient. PowerSGD's
  is the best rank-r error from the singular values (what warm-started power iteration tends to,
  the paper's "SVD" measure); top-k's the norm of what it drops; quantizers' the real round trip.
  With a weight (lgreco's `error_metric: adam`), each error is weighted per value before the norm.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from raylane.comm import Compressor, expected_bytes_sent
from raylane.comm.compressors import Bf16, Fp16, Identity
from raylane.comm.powersgd import PowerSGD
from raylane.comm.quantizers import FP4Quantizer, Int2Quantizer, IntQuantizer, SignQuantizer
from raylane.comm.sparse import TopK, kept

FAMILIES = ("powersgd", "topk", "quant", "mixed")
QUANT_FORMATS = {"bf16": Bf16, "fp16": Fp16, "int8": lambda: IntQuantizer(8, 256),
                 "int4": lambda: IntQuantizer(4, 128), "int2": lambda: Int2Quantizer(128), "fp4_e2m1": lambda: FP4Quantizer("e2m1", 128),
                 "fp4_e3m0": lambda: FP4Quantizer("e3m0", 128), "sign": lambda: SignQuantizer(256)}
_COLLECTIVE = {"none": "quantized_allreduce", "quant": "quantized_allreduce", "topk": "compressed_allgather",
               "powersgd": "powersgd_allreduce"}


def family(level: str) -> str:
    """none | quant | topk | powersgd; ValueError for a level that is none of these."""
    if level == "none":
        return "none"
    if level in QUANT_FORMATS:
        return "quant"
    head, _, arg = level.partition(":")
    if head == "powersgd" and arg.isdigit() and int(arg) >= 1:
        return "powersgd"
    if head == "topk":
        try:
            if 0 < float(arg) <= 1:
                return "topk"
        except ValueError:
            pass
    raise ValueError(f"level {level!r}: must be 'none', 'powersgd:<rank >= 1>', 'topk:<ratio in (0, 1]>' "
                     f"or one of {sorted(QUANT_FORMATS)}")


def powersgd_level(rank: int) -> str:
    return f"powersgd:{rank}"


def topk_level(ratio: float) -> str:
    return f"topk:{ratio:g}"


@lru_cache(maxsize=None)
def compressor(level: str, seed: int = 0) -> Compressor:
    """The (stateless, shared) compressor of a level; PowerSGD's is a template: its warm-start
    factors are kept per layer by the caller, never in this shared object."""
    kind = family(level)
    if kind == "none":
        return Identity()
    if kind == "quant":
        return QUANT_FORMATS[level]()
    if kind == "topk":
        return TopK(float(level.partition(":")[2]))
    return PowerSGD(int(level.partition(":")[2]), warm_start=True, seed=seed)


def applies(level: str, shape: torch.Size) -> bool:
    """PowerSGD needs a matrix; every level must send less than the layer's full precision."""
    if family(level) == "powersgd" and len(shape) < 2:
        return False
    return level == "none" or wire_bytes(level, tuple(shape), 2) < wire_bytes("none", tuple(shape), 2)


def in_range(level: str, default: str, shape: torch.Size, world: int, bounds: list[float] | None) -> bool:
    """Whether `level` sends between bounds[0] and bounds[1] times the default level's bytes on a
    layer of `shape` among `world` ranks (at least 2: one rank sends nothing), as the paper picks
    ranks from gamma x to beta x the default rank; 1% slack for rounding (top-k's k). bounds None: any."""
    if bounds is None:
        return True
    world = max(world, 2)
    ratio = wire_bytes(level, tuple(shape), world) / wire_bytes(default, tuple(shape), world)
    return bounds[0] * 0.99 <= ratio <= bounds[1] * 1.01


@lru_cache(maxsize=4096)
def wire_bytes(level: str, shape: tuple[int, ...], world: int) -> int:
    """Payload bytes every rank together sends for one sync of an fp32 layer of `shape`."""
    collective, c = _COLLECTIVE[family(level)], compressor(level)
    arg = [shape] if collective == "powersgd_allreduce" else shape
    return sum(expected_bytes_sent(collective, arg, torch.float32, world, r, c) for r in range(world))


def errors(levels: list[str], acc: torch.Tensor, weight: torch.Tensor | None = None) -> list[float]:
    """||C(acc) - acc||_2 for each level (nan where the level does not apply), in float64.

    `weight` (acc's shape, >= 0): the error is ||(C(acc) - acc) * weight||_2 instead, e.g. Adam's
    1 / (sqrt(v) + eps), which measures the error in the optimizer's update space; PowerSGD's is
    then that of the best rank-r approximation (truncated SVD) rather than the singular values' tail.
    """
    flat = acc.detach().double().reshape(-1)
    w = None if weight is None else weight.detach().double().reshape(-1)
    out, svals, tail, svd = [], None, None, None
    for level in levels:
        kind = family(level)
        if not applies(level, acc.shape):
            out.append(math.nan)
        elif kind == "none":
            out.append(0.0)
        elif kind == "powersgd" and w is not None:
            if svd is None:
                svd = torch.linalg.svd(flat.view(acc.shape[0], -1), full_matrices=False)
            u, s, vh = svd
            r = int(level.partition(":")[2])
            approx = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(-1)
            out.append(float(((approx - flat) * w).norm()))
        elif kind == "powersgd":
            if svals is None:
                rows = acc.shape[0]
                svals = torch.linalg.svdvals(acc.detach().double().reshape(rows, -1)).square()
            r = int(level.partition(":")[2])
            out.append(float(svals[r:].sum().sqrt()))
        elif kind == "topk" and w is None:
            if tail is None:  # tail[k] = sum of squares of all but the k largest magnitudes
                sq = flat.square().sort(descending=True).values
                tail = torch.cat([sq.sum().reshape(1), sq.sum() - sq.cumsum(0)]).clamp_(min=0)
            k = kept(flat.numel(), float(level.partition(":")[2]))
            out.append(float(tail[k].sqrt()))
        elif kind == "topk":  # what it drops: all but the k largest magnitudes
            k = kept(flat.numel(), float(level.partition(":")[2]))
            dropped = flat.clone()
            dropped[flat.abs().topk(k).indices] = 0
            out.append(float((dropped * w).norm()))
        else:
            c = compressor(level)
            approx = c.decompress(c.compress(acc.detach().float())).double().reshape(-1)
            diff = approx - flat
            out.append(float((diff if w is None else diff * w).norm()))
    return out
