"""Blockwise quantizers: int2..int8, 4-bit floats (e2m1, e3m0), 1-bit sign. Packed, with fp32 scales.

Each block of `block_size` consecutive values has one fp32 scale. Error bounds per value (nearest
rounding; stochastic rounding doubles them but is unbiased):

- int{3..8}: scale = absmax / qmax (qmax = 2^(bits-1) - 1); |error| <= scale / 2. int8 and int4 are
  `IntQuantizer` (fused kernels on the collectives' fast path), int3/5/6/7 `PackedIntQuantizer`.
- int2: levels {-3, -1, 1, 3} x scale, scale = absmax / 3; |error| <= scale.
- fp4: scale = absmax / grid max; |error| <= half the gap between the two grid points around |x|/scale,
  times scale (e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6; e3m0 grid 0, 2^-6 .. 2^0).
- sign: scale = mean |x| of the block; value = scale * sign(x) (0 counts as +);
  sum of squared errors of a block = ||x||^2 - n * scale^2.

Wire bytes for n values in b blocks: int<k> ceil(n k / 8) + 4b (int8 n + 4b, int4 ceil(n/2) + 4b,
int2 ceil(n/4) + 4b); fp4 ceil(n/2) + 4b; sign ceil(n/8) + 4b.
`int_quantizer(bits, ...)` (the `int` compressor of the registry) builds the right class for 2..8 bits.
"""

from __future__ import annotations

import math

import torch

from raylane.comm import quant
from raylane.comm.compressors import (Compressor, Payload, SeededGenerators, ShapeLike, as_shape, check_choice,
                                      check_int)


class _Blockwise(Compressor):
    """Shared by the quantizers: block size, optional stochastic rounding, scale per block."""

    def __init__(self, block_size: int, stochastic: bool, seed: int):
        check_int("block_size", block_size, 1)
        check_choice("stochastic", stochastic, [False, True])
        check_int("seed", seed, 0)
        self.block_size, self.stochastic, self.align = block_size, stochastic, block_size
        self._rngs = SeededGenerators(seed)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        return self._rngs.get(device) if self.stochastic else None

    def _num_blocks(self, shape: ShapeLike) -> int:
        return quant.num_blocks(math.prod(as_shape(shape)), self.block_size)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        return quant.to_blocks(t.reshape(-1).float(), self.block_size)

    def _expand(self, values: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        """values (flat, numel) times their block's scale."""
        return (quant.to_blocks(values, self.block_size) * scales.unsqueeze(1)).reshape(-1)[:numel]

    def state_dict(self) -> dict:
        return {"rng": self._rngs.state_dict()} if self.stochastic else {}

    def load_state_dict(self, state: dict) -> None:
        self._rngs.load_state_dict(state.get("rng", {}))

    def __repr__(self) -> str:
        return f"{self.name}(block_size={self.block_size}{', stochastic' if self.stochastic else ''})"


class IntQuantizer(_Blockwise):
    """Symmetric absmax integer quantization to 8 or 4 bits (4-bit codes packed two per byte)."""

    def __init__(self, bits: int = 8, block_size: int = 256, stochastic: bool = False, seed: int = 0):
        check_choice("bits", bits, [4, 8])
        super().__init__(block_size, stochastic, seed)
        self.bits, self.qmax, self.name = bits, 2 ** (bits - 1) - 1, f"int{bits}"

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        n = math.prod(as_shape(shape))
        codes = n if self.bits == 8 else -(-n // 2)
        return {"scales": (torch.float32, self._num_blocks(shape)), "codes": (torch.uint8, codes)}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        blocks = self._blocks(t)
        scales = quant.div_scalar(quant.block_absmax(blocks), self.qmax)
        q = quant.round_to_int_(quant.scale_rows(blocks, scales), self._generator(t.device))
        q = q.clamp_(-self.qmax, self.qmax).reshape(-1)[:t.numel()]
        if self.bits == 8:
            codes = q.to(torch.int8).view(torch.uint8)
        else:
            codes = quant.pack_nibbles(q.add_(8).to(torch.uint8))
        return {"scales": scales, "codes": codes}

    def _decode(self, payload: Payload) -> torch.Tensor:
        codes, n = payload.parts["codes"], payload.numel
        if self.bits == 8:
            q = codes.view(torch.int8).float()
        else:
            q = quant.unpack_nibbles(codes, n).float() - 8
        return self._expand(q, payload.parts["scales"], n)


class PackedIntQuantizer(_Blockwise):
    """Symmetric absmax integers of 3, 5, 6 or 7 bits, bit-packed (codes q + qmax in 0..2 qmax)."""

    def __init__(self, bits: int = 6, block_size: int = 256, stochastic: bool = False, seed: int = 0):
        check_choice("bits", bits, [3, 5, 6, 7])
        super().__init__(block_size, stochastic, seed)
        self.bits, self.qmax, self.name = bits, 2 ** (bits - 1) - 1, f"int{bits}"

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        n = math.prod(as_shape(shape))
        return {"scales": (torch.float32, self._num_blocks(shape)), "codes": (torch.uint8, -(-n * self.bits // 8))}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        blocks = self._blocks(t)
        scales = quant.div_scalar(quant.block_absmax(blocks), self.qmax)
        q = quant.round_to_int_(quant.scale_rows(blocks, scales), self._generator(t.device))
        q = q.clamp_(-self.qmax, self.qmax).reshape(-1)[:t.numel()].add_(self.qmax).to(torch.uint8)
        return {"scales": scales, "codes": quant.pack_uint(q, self.bits)}

    def _decode(self, payload: Payload) -> torch.Tensor:
        q = quant.unpack_uint(payload.parts["codes"], payload.numel, self.bits).float() - self.qmax
        return self._expand(q, payload.parts["scales"], payload.numel)


def int_quantizer(bits: int = 8, block_size: int = 256, stochastic: bool = False, seed: int = 0) -> _Blockwise:
    """The `int` compressor: `bits` in 2..8 (2: the mid-rise grid of `Int2Quantizer`)."""
    check_choice("bits", bits, list(range(2, 9)))
    if bits == 2:
        return Int2Quantizer(block_size, stochastic, seed)
    cls = IntQuantizer if bits in (4, 8) else PackedIntQuantizer
    return cls(bits, block_size, stochastic, seed)


class Int2Quantizer(_Blockwise):
    """2 bits per value (four packed per byte): the uniform 4-level grid {-3, -1, 1, 3} x absmax / 3.

    Mid-rise, no zero level: a symmetric 2-bit integer would leave one of its four codes unused
    ({-1, 0, 1}). Nearest rounding: code = round((x / s + 3) / 2), s = absmax / 3, |error| <= s;
    stochastic rounding is unbiased on the same grid.
    """

    name = "int2"

    def __init__(self, block_size: int = 256, stochastic: bool = False, seed: int = 0):
        super().__init__(block_size, stochastic, seed)

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        n = math.prod(as_shape(shape))
        return {"scales": (torch.float32, self._num_blocks(shape)), "codes": (torch.uint8, -(-n // 4))}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        blocks = self._blocks(t)
        scales = quant.block_absmax(blocks) / 3
        y = quant.scale_rows(blocks, scales).add_(3).mul_(0.5)
        q = quant.round_to_int_(y, self._generator(t.device)).clamp_(0, 3).reshape(-1)[:t.numel()]
        return {"scales": scales, "codes": quant.pack_crumbs(q.to(torch.uint8))}

    def _decode(self, payload: Payload) -> torch.Tensor:
        q = quant.unpack_crumbs(payload.parts["codes"], payload.numel).float().mul_(2).sub_(3)
        return self._expand(q, payload.parts["scales"], payload.numel)


class FP4Quantizer(_Blockwise):
    """4-bit floats, sign bit + 3-bit magnitude index into the format's grid; scale per block."""

    def __init__(self, format: str = "e2m1", block_size: int = 256, stochastic: bool = False, seed: int = 0):
        check_choice("format", format, sorted(quant.FP4_GRIDS))
        super().__init__(block_size, stochastic, seed)
        self.format, self.name, self.grid = format, f"fp4_{format}", list(quant.FP4_GRIDS[format])
        self._values = torch.tensor(self.grid + [-v for v in self.grid], dtype=torch.float32)  # by 4-bit code

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        n = math.prod(as_shape(shape))
        return {"scales": (torch.float32, self._num_blocks(shape)), "codes": (torch.uint8, -(-n // 2))}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        blocks = self._blocks(t)
        scales = quant.div_scalar(quant.block_absmax(blocks), self.grid[-1])
        mag = quant.scale_rows(blocks, scales).reshape(-1)[:t.numel()]
        negative = mag < 0
        mag = mag.abs_().clamp_(max=self.grid[-1])
        codes = quant.round_to_grid(mag, self.grid, self._generator(t.device))
        return {"scales": scales, "codes": quant.pack_nibbles(codes.add_(negative.to(torch.uint8) << 3))}

    def _decode(self, payload: Payload) -> torch.Tensor:
        codes = quant.unpack_nibbles(payload.parts["codes"], payload.numel)
        values = self._values.to(codes.device).index_select(0, codes.int())
        return self._expand(values, payload.parts["scales"], payload.numel)


class SignQuantizer(_Blockwise):
    """1 bit per value (its sign, packed eight per byte) and the block's mean |x| as scale."""

    name = "sign"

    def __init__(self, block_size: int = 256):
        super().__init__(block_size, False, 0)

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        n = math.prod(as_shape(shape))
        return {"scales": (torch.float32, self._num_blocks(shape)), "signs": (torch.uint8, -(-n // 8))}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        blocks, n = self._blocks(t), t.numel()
        counts = torch.full((blocks.shape[0],), float(self.block_size), device=t.device)
        if n % self.block_size:
            counts[-1] = n % self.block_size
        scales = blocks.abs().sum(dim=1) / counts
        return {"scales": scales, "signs": quant.pack_bits(t.reshape(-1) >= 0)}

    def _decode(self, payload: Payload) -> torch.Tensor:
        positive = quant.unpack_bits(payload.parts["signs"], payload.numel)
        return self._expand(positive.float() * 2 - 1, payload.parts["scales"], payload.numel)
