"""The compression levels L-GreCo chooses among, per layer: what each sends and how much it errs.

A level is a compressor spec of the comm layer's one registry (`raylane.comm.parse_spec`: the
same names, parameters and codecs as `compression=`), kept in its canonical form (`spec_of`):
"none" (full precision), "powersgd:<rank>", "topk:<ratio>", "int:<bits 2..8>:<block size>",
"fp4:<format>:<block size>", "sign:<block size>", "bf16", "fp16". Its family says which collective
carries it: quant and none a quantized allreduce (alltoall reduce-scatter + allgather of payloads), topk a compressed
allgather, powersgd a PowerSGD allreduce (two allreduces of fp32 factors).

- `wire_bytes(level, shape, world)`: the payload bytes all ranks together send for one sync of a
  layer of that shape (the comm layer's formulas, which its Communicator counts with).
- `applies(level, shape, world)`: PowerSGD needs a matrix, and every level must send fewer bytes
  than full precision at this world size (top-k's allgather grows with the world).
- `in_range(level, default, shape, world, bounds)`: whether a level is a candidate for a layer, its
  bytes within [gamma, beta] x the default level's (the paper's ranks r/4..4r around the default).
- `errors(levels, acc)`: ||C(acc) - acc||_2 per level for one layer's accumulated gradient. PowerSGD's
  is the best rank-r error from the singular values (what warm-started power iteration tends to,
  the paper's "SVD" measure); top-k's the norm of what it drops; quantizers' the real round trip.
  With a weight (lgreco's `error_metric: adam`), each error is weighted per value before the norm.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from raylane.comm import Compressor, expected_bytes_sent, parse_spec, spec_of
from raylane.comm.sparse import kept

FAMILIES = ("powersgd", "topk", "quant", "mixed")
_FAMILY_OF = {"none": "none", "powersgd": "powersgd", "topk": "topk", "int": "quant", "fp4": "quant",
              "sign": "quant", "bf16": "quant", "fp16": "quant"}
_COLLECTIVE = {"none": "quantized_allreduce", "quant": "quantized_allreduce", "topk": "compressed_allgather",
               "powersgd": "powersgd_allreduce"}
REFERENCE_SHAPE = (4096, 4096)  # the layer config validation judges a default level on (see lgreco_config)


@lru_cache(maxsize=None)
def canonical(level: str, prefix: str = "level") -> str:
    """The canonical spec of a level; ValueError (one line, naming `prefix`) for anything else."""
    cfg = parse_spec(level, prefix)
    if cfg.name not in _FAMILY_OF or cfg.error_feedback or cfg.zstd_level is not None:
        raise ValueError(f"{prefix}={level!r}: not a level; must be 'none' or a {sorted(set(_FAMILY_OF) - {'none'})} "
                         "compressor spec (e.g. 'powersgd:4', 'topk:0.01', 'int:4:128')")
    return spec_of(cfg)


def family(level: str) -> str:
    """none | quant | topk | powersgd; ValueError for a level that is none of these."""
    return _FAMILY_OF[parse_spec(canonical(level)).name]


def powersgd_level(rank: int) -> str:
    return f"powersgd:{rank}"


def topk_level(ratio: float) -> str:
    return f"topk:{ratio:g}"


def quant_level(bits: int, block_size: int) -> str:
    return f"int:{bits}:{block_size}"


def topk_grid(per_octave: int, low: float = 1e-4, high: float = 0.5) -> list[float]:
    """A geometric grid of densities, `per_octave` per doubling, from `low` up to `high`."""
    n = int(math.floor(math.log2(high / low) * per_octave + 1e-9))
    return [float(f"{low * 2 ** (i / per_octave):.4g}") for i in range(n + 1)]


@lru_cache(maxsize=None)
def compressor(level: str) -> Compressor:
    """The shared compressor of a level (stateless ones only: PowerSGD's warm-start factors live in
    one PowerSGD per layer that the caller keeps, see `new_compressor`)."""
    return new_compressor(level)


def new_compressor(level: str) -> Compressor:
    """A fresh compressor of a level, built by the comm layer's registry."""
    return parse_spec(canonical(level)).build()


def rank_of(level: str) -> int:
    return int(parse_spec(canonical(level)).rank)


def applies(level: str, shape: tuple[int, ...], world: int) -> bool:
    """PowerSGD needs a matrix; every level but none must send fewer bytes than full precision among
    `world` ranks (at least 2: one rank sends nothing)."""
    if level == "none":
        return True
    if family(level) == "powersgd" and len(shape) < 2:
        return False
    world = max(world, 2)
    return wire_bytes(level, tuple(shape), world) < wire_bytes("none", tuple(shape), world)


def in_range(level: str, default: str, shape: tuple[int, ...], world: int, bounds: list[float] | None) -> bool:
    """Whether `level` sends between bounds[0] and bounds[1] times the default level's bytes on a
    layer of `shape` among `world` ranks, as the paper picks ranks from gamma x to beta x the
    default rank; 1% slack for rounding (top-k's k, block scales). bounds None: any."""
    if bounds is None:
        return True
    world = max(world, 2)
    ratio = wire_bytes(level, tuple(shape), world) / wire_bytes(default, tuple(shape), world)
    return bounds[0] * 0.99 <= ratio <= bounds[1] * 1.01


@lru_cache(maxsize=16384)
def wire_bytes(level: str, shape: tuple[int, ...], world: int) -> int:
    """Payload bytes every rank together sends for one sync of an fp32 layer of `shape`."""
    collective, c = _COLLECTIVE[family(level)], compressor(level)
    arg = [shape] if collective == "powersgd_allreduce" else shape
    return sum(expected_bytes_sent(collective, arg, torch.float32, world, r, c) for r in range(world))


def bytes_per_value(level: str, shape: tuple[int, ...]) -> float:
    """Payload bytes per gradient value of one rank's compressed layer (fp32: 4)."""
    return compressor(level).payload_bytes(shape, torch.float32) / math.prod(shape)


def errors(levels: list[str], acc: torch.Tensor, weight: torch.Tensor | None = None) -> list[float]:
    """||C(acc) - acc||_2 for each level (nan where PowerSGD meets a vector), in float64.

    `weight` (acc's shape, >= 0): the error is ||(C(acc) - acc) * weight||_2 instead, e.g. Adam's
    1 / (sqrt(v) + eps), which measures the error in the optimizer's update space; PowerSGD's is
    then that of the best rank-r approximation (truncated SVD) rather than the singular values' tail.
    """
    flat = acc.detach().double().reshape(-1)
    w = None if weight is None else weight.detach().double().reshape(-1)
    out, cache = [], {}
    for level in levels:
        kind = family(level)
        if kind == "none":
            out.append(0.0)
        elif kind == "powersgd":
            out.append(_powersgd_error(rank_of(level), acc, flat, w, cache))
        elif kind == "topk":
            out.append(_topk_error(float(parse_spec(level).ratio), flat, w, cache))
        else:
            c = compressor(level)
            diff = c.decompress(c.compress(acc.detach().float())).double().reshape(-1) - flat
            out.append(float((diff if w is None else diff * w).norm()))
    return out


def _powersgd_error(r: int, acc: torch.Tensor, flat: torch.Tensor, w: torch.Tensor | None, cache: dict) -> float:
    if acc.dim() < 2:
        return math.nan
    m = flat.view(acc.shape[0], -1)
    if w is None:
        if "svals" not in cache:
            cache["svals"] = torch.linalg.svdvals(m).square()
        return float(cache["svals"][r:].sum().sqrt())
    if "svd" not in cache:
        cache["svd"] = torch.linalg.svd(m, full_matrices=False)
    u, s, vh = cache["svd"]
    approx = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(-1)
    return float(((approx - flat) * w).norm())


def _topk_error(ratio: float, flat: torch.Tensor, w: torch.Tensor | None, cache: dict) -> float:
    k = kept(flat.numel(), ratio)
    if w is None:
        if "tail" not in cache:  # tail[k] = sum of squares of all but the k largest magnitudes
            sq = flat.square().sort(descending=True).values
            cache["tail"] = torch.cat([sq.sum().reshape(1), sq.sum() - sq.cumsum(0)]).clamp_(min=0)
        return float(cache["tail"][k].sqrt())
    dropped = flat.clone()
    dropped[flat.abs().topk(k).indices] = 0
    return float((dropped * w).norm())
