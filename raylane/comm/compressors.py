"""The Compressor contract, exact casts and the zstd lossless stage.

A Compressor turns a float tensor (float32, bfloat16 or float16; any shape) into a `Payload`:
named tensors that travel, plus the shape and dtype the receiver already knows. Contract:

- `compress(t, key)` -> Payload; `decompress(payload)` -> tensor of t's shape and dtype.
  `key` names the tensor for compressors that keep state per tensor (error feedback, PowerSGD,
  random-k's index stream); stateless ones ignore it.
- `payload_bytes(shape, dtype)` is the exact size on the wire (`Payload.nbytes`) for fixed-size
  compressors, and `layout()` says which parts make it up, so a receiver can parse
  `Payload.to_bytes()` with `from_bytes()`. Variable-size ones (zstd) have `fixed_size = False`.
- `expected_ratio(shape, dtype)` = payload bytes / raw bytes.
- inf or nan input raises ValueError: a compressor that cannot run raises, it never quietly sends
  full precision. `none` (Identity) is exact full precision, chosen explicitly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ShapeLike = int | Sequence[int]


def as_shape(shape: ShapeLike) -> torch.Size:
    return torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)


def check_choice(key: str, value: object, allowed: Sequence) -> None:
    if type(value) not in {type(a) for a in allowed} or value not in allowed:
        raise ValueError(f"{key}={value!r}: must be one of {list(allowed)}")


def check_int(key: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{key}={value!r}: must be {allowed}")


def check_fraction(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{key}={value!r}: must be a number in (0, 1]")


@dataclass
class Payload:
    """What one compressed tensor puts on the wire (`parts`), and what the receiver knows."""

    parts: dict[str, torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())

    def to_bytes(self) -> torch.Tensor:
        """All parts as one flat uint8 tensor, in layout order."""
        flat = [p.contiguous().reshape(-1).view(torch.uint8) for p in self.parts.values()]
        return torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)


class SeededGenerators:
    """One torch.Generator per device, all seeded alike; their states go into state_dict."""

    def __init__(self, seed: int):
        self.seed, self._gens = seed, {}

    def get(self, device: torch.device) -> torch.Generator:
        name = str(device)
        if name not in self._gens:
            self._gens[name] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[name]

    def state_dict(self) -> dict:
        return {name: g.get_state() for name, g in self._gens.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, rng_state in state.items():
            self.get(torch.device(name)).set_state(rng_state)


class Compressor(ABC):
    """compress -> Payload -> decompress; see the module docstring for the contract."""

    name = "compressor"
    lossless = False
    fixed_size = True  # payload size is a function of (shape, dtype)
    chunkable = True  # element ranges of a flat tensor may be compressed independently
    align = 1  # chunk boundaries (in elements) that keep blocks whole

    def compress(self, t: torch.Tensor, key: str = "") -> Payload:
        check_input(self.name, t)
        return Payload(self._encode(t.detach(), key), t.shape, t.dtype)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self._decode(payload).reshape(payload.shape).to(payload.dtype)

    @abstractmethod
    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        """The parts, in `layout` order, for a finite float tensor."""

    @abstractmethod
    def _decode(self, payload: Payload) -> torch.Tensor:
        """The reconstruction (any float dtype, any shape with payload.numel elements)."""

    @abstractmethod
    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        """Name -> (dtype, numel) of each part, widest dtype first so parts stay aligned."""

    def payload_bytes(self, shape: ShapeLike, dtype: torch.dtype) -> int:
        return sum(d.itemsize * n for d, n in self.layout(shape, dtype).values())

    def expected_ratio(self, shape: ShapeLike, dtype: torch.dtype) -> float:
        raw = math.prod(as_shape(shape)) * dtype.itemsize
        return self.payload_bytes(shape, dtype) / raw if raw else 1.0

    def from_bytes(self, buf: torch.Tensor, shape: ShapeLike, dtype: torch.dtype) -> Payload:
        """Parse `Payload.to_bytes()` of a tensor of this shape and dtype."""
        shape, parts, offset = as_shape(shape), {}, 0
        expected = self.payload_bytes(shape, dtype)
        if buf.numel() != expected:
            raise ValueError(f"{self.name}: got {buf.numel()} payload bytes for shape {tuple(shape)}, "
                             f"expected {expected}")
        for name, (part_dtype, numel) in self.layout(shape, dtype).items():
            piece = buf[offset:offset + numel * part_dtype.itemsize]
            if piece.storage_offset() % part_dtype.itemsize:
                piece = piece.clone()
            parts[name] = piece.view(part_dtype)
            offset += numel * part_dtype.itemsize
        return Payload(parts, shape, dtype)

    def state_dict(self) -> dict:
        """Stateless by default; stateful compressors return what a checkpoint must keep."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name}: is stateless but got state with keys {sorted(state)}")

    def __repr__(self) -> str:
        return self.name


def check_input(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: tensor dtype {t.dtype}: must be one of {list(FLOAT_DTYPES)}")
    if t.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(t.detach())):  # nan propagates
        raise ValueError(f"{name}: tensor of shape {tuple(t.shape)} has inf or nan values; "
                         "compressors take finite tensors only")


class Identity(Compressor):
    """`none`: the tensor's own bytes, exact. An explicit choice, never a fallback."""

    name, lossless = "none", True

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        return {"values": (dtype, math.prod(as_shape(shape)))}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        return {"values": t.reshape(-1).clone()}

    def _decode(self, payload: Payload) -> torch.Tensor:
        return payload.parts["values"]


class Cast(Compressor):
    """Round to a 16-bit float (nearest even). Values beyond its range raise, never become inf."""

    def __init__(self, name: str, target: torch.dtype):
        self.name, self.target = name, target

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        return {"values": (self.target, math.prod(as_shape(shape)))}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        values = t.reshape(-1).to(self.target)
        if t.dtype != self.target and values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{self.name}: |values| up to {t.abs().max().item():.4g} overflow "
                             f"{self.target} (max {torch.finfo(self.target).max:.6g})")
        return {"values": values}

    def _decode(self, payload: Payload) -> torch.Tensor:
        return payload.parts["values"]


class Fp16(Cast):
    def __init__(self):
        super().__init__("fp16", torch.float16)


class Bf16(Cast):
    def __init__(self):
        super().__init__("bf16", torch.bfloat16)


class Zstd(Compressor):
    """A lossless zstd stage after any compressor; payload sizes vary with the data (CPU codec)."""

    fixed_size = False

    def __init__(self, inner: Compressor, level: int = 3):
        check_int("zstd_level", level, 1, 22)
        self.inner, self.level = inner, level
        self.name = f"{inner.name}+zstd{level}"
        self.lossless, self.chunkable, self.align = inner.lossless, inner.chunkable, inner.align

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        import zstandard  # only here: raylane.comm imports without it (GPU hosts that lack it)

        raw = self.inner.compress(t, key).to_bytes().cpu().numpy().tobytes()
        packed = zstandard.ZstdCompressor(level=self.level).compress(raw)
        return {"zstd": _as_tensor(packed, t.device)}

    def _decode(self, payload: Payload) -> torch.Tensor:
        import zstandard

        buf = payload.parts["zstd"]
        raw = zstandard.ZstdDecompressor().decompress(buf.cpu().numpy().tobytes())
        inner_buf = _as_tensor(raw, buf.device)
        return self.inner.decompress(self.inner.from_bytes(inner_buf, payload.shape, payload.dtype))

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        raise ValueError(f"{self.name}: payload size depends on the data; read Payload.nbytes")

    def expected_ratio(self, shape: ShapeLike, dtype: torch.dtype) -> float:
        """The inner compressor's ratio: what zstd starts from (it only shrinks what repeats)."""
        return self.inner.expected_ratio(shape, dtype)

    def from_bytes(self, buf: torch.Tensor, shape: ShapeLike, dtype: torch.dtype) -> Payload:
        return Payload({"zstd": buf}, as_shape(shape), dtype)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def _as_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
