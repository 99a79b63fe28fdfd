"""The `compression` config group: a compressor's name and parameters, validated, then built.

configs/compression/*.yaml each hold `name:` plus the parameters that compressor takes; any
strategy names one. Parameters left None take the compressor's defaults; a parameter the named
compressor does not take is an error, as is an unknown name or an impossible value, each a
one-line ValueError naming the key (`compression.bits=9: must be one of [2, 3, 4, 5, 6, 7, 8]`).
`none` is exact full precision, chosen explicitly; nothing falls back to it. `compile` switches the
int/fp4 kernels' torch.compile path for the process (`raylane.comm.kernels`; on by default);
`pipeline_floats` sets the stage size of pipelined quantized allreduces for the process
(`raylane.comm.pipeline`; 0 = off, None = the process default: off; 4194304 suits thin links).

Registry: `register_compressor(name, factory)`; a duplicate name raises.

Specs: one compressor as one string, for lists of them (L-GreCo's levels are specs, built from this
same registry): `name`, `name:v1:v2...` (the factory's parameters in order: `topk:0.01`,
`powersgd:4`, `int:4:128` = 4 bits, blocks of 128) or `name:key=value,...` (`int:bits=4,block_size=128`;
quote it in a Hydra override). `parse_spec` gives the config, `spec_of` its canonical string.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Optional

from raylane.comm import kernels, pipeline
from raylane.comm.compressors import Bf16, Compressor, Fp16, Identity, Zstd
from raylane.comm.error_feedback import ErrorFeedback
from raylane.comm.powersgd import PowerSGD
from raylane.comm.quantizers import FP4Quantizer, SignQuantizer, int_quantizer
from raylane.comm.sparse import RandomK, TopK

_REGISTRY: dict[str, Callable[..., Compressor]] = {}
# Compressors whose randomness should differ across ranks (rounding noise): build() adds the rank to
# their seed. Random-k is not among them: its positions must agree across ranks.
_PER_RANK_SEED = ("int", "fp4")


def register_compressor(name: str, factory: Callable[..., Compressor]) -> None:
    """Make `name` buildable from config; `factory`'s keyword parameters are its config keys."""
    if name in _REGISTRY:
        raise ValueError(f"compressor {name!r} is already registered")
    _REGISTRY[name] = factory


def compressor_names() -> list[str]:
    return sorted(_REGISTRY)


for _name, _factory in [("none", Identity), ("fp16", Fp16), ("bf16", Bf16), ("int", int_quantizer),
                        ("fp4", FP4Quantizer), ("sign", SignQuantizer), ("topk", TopK), ("randomk", RandomK),
                        ("powersgd", PowerSGD)]:
    register_compressor(_name, _factory)


@dataclass
class CompressionConfig:
    """`name` picks the compressor; the other fields are its parameters (None: its default)."""

    name: str = "none"
    bits: Optional[int] = None  # int: 4 | 8
    block_size: Optional[int] = None  # int, fp4, sign: values per fp32 scale
    stochastic: Optional[bool] = None  # int, fp4: stochastic rounding
    format: Optional[str] = None  # fp4: e2m1 | e3m0
    ratio: Optional[float] = None  # topk, randomk: fraction of values kept
    rank: Optional[int] = None  # powersgd
    warm_start: Optional[bool] = None  # powersgd
    seed: Optional[int] = None  # int, fp4, randomk, powersgd
    zstd_level: Optional[int] = None  # a lossless zstd stage after the compressor (1..22); None: no stage
    error_feedback: bool = False  # keep and re-send what compression left out
    compile: Optional[bool] = None  # int/fp4 kernels through torch.compile (None: the process default, on)
    pipeline_floats: Optional[int] = None  # floats per pipelined allreduce stage, 0 = off (None: default)

    def params(self) -> dict:
        skip = {"name", "zstd_level", "error_feedback", "compile", "pipeline_floats"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}

    def validate(self, prefix: str = "compression") -> None:
        """Raise ValueError (`{prefix}.{key}={value}: ...`) unless `build()` would succeed."""
        self.build(prefix=prefix)

    def build(self, rank: int = 0, prefix: str = "compression") -> Compressor:
        """The compressor for worker `rank` (rank offsets the seed of rounding noise only)."""
        factory = _REGISTRY.get(self.name)
        if factory is None:
            raise ValueError(f"{prefix}.name={self.name!r}: unknown compressor; must be one of {compressor_names()}")
        params, takes = self.params(), inspect.signature(factory).parameters
        for key, value in params.items():
            if key not in takes:
                raise ValueError(f"{prefix}.{key}={value!r}: compressor {self.name!r} does not take it "
                                 f"(it takes {sorted(takes) or 'nothing'})")
        if self.name in _PER_RANK_SEED and params.get("stochastic"):
            params["seed"] = params.get("seed", 0) + rank
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"{prefix}.error_feedback={self.error_feedback!r}: must be one of [False, True]")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"{prefix}.compile={self.compile!r}: must be one of [None, False, True]")
        pf = self.pipeline_floats
        if pf is not None and (isinstance(pf, bool) or not isinstance(pf, int) or pf < 0):
            raise ValueError(f"{prefix}.pipeline_floats={pf!r}: must be an integer >= 0 (0 = off) or None")
        if self.compile is not None:
            kernels.configure(compile=self.compile)
        if pf is not None:
            pipeline.configure(pipeline_floats=pf)
        try:
            compressor = factory(**params)
            if self.error_feedback:
                compressor = ErrorFeedback(compressor)
            return compressor if self.zstd_level is None else Zstd(compressor, self.zstd_level)
        except ValueError as err:
            raise ValueError(f"{prefix}.{err}") from None


def _value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str, prefix: str = "compression") -> CompressionConfig:
    """`name`, `name:v1:v2...` (the factory's parameters in order) or `name:key=value,...` -> its
    CompressionConfig, validated (one-line ValueError naming `prefix` and the spec otherwise)."""
    name, _, rest = str(spec).partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"{prefix}={spec!r}: unknown compressor {name!r}; must be one of {compressor_names()}")
    keys, order = {f.name for f in fields(CompressionConfig)} - {"name"}, list(inspect.signature(factory).parameters)
    params: dict = {}
    named = False
    for i, item in enumerate(filter(None, rest.replace(",", ":").split(":"))):
        key, eq, text = item.partition("=")
        named = named or bool(eq)
        if not eq:  # positional: the factory's i-th parameter
            if i >= len(order) or named:
                raise ValueError(f"{prefix}={spec!r}: bare values name the first parameters {order} in order, "
                                 "before any key=value")
            key, text = order[i], item
        key = key.strip()
        if key not in keys:
            raise ValueError(f"{prefix}={spec!r}: unknown key {key!r}")
        params[key] = _value(text.strip())
    cfg = CompressionConfig(name, **params)
    try:
        cfg.validate(prefix)
    except ValueError as err:
        raise ValueError(f"{prefix}={spec!r}: {err}") from None
    return cfg


def _text(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def spec_of(cfg: CompressionConfig) -> str:
    """The canonical spec of a config's compressor parameters: positional (`int:4:128`) when the set
    parameters are the factory's first ones, else `name:key=value,...` in the factory's order."""
    params, order = cfg.params(), list(inspect.signature(_REGISTRY[cfg.name]).parameters)
    if not params:
        return cfg.name
    if all(k in params for k in order[:len(params)]):
        return ":".join([cfg.name, *(_text(params[k]) for k in order[:len(params)])])
    return f"{cfg.name}:" + ",".join(f"{k}={_text(params[k])}" for k in order if k in params)
