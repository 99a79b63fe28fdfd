"""Quantization and packing kernels: blockwise scaling, rounding onto a grid, sub-byte packing.

Pure tensor functions, on any device. Blocks are consecutive runs of `block` elements of a
flat fp32 tensor; the last block is zero-padded, and the padding never travels. Rounding is
to nearest (ties to even on integer grids, to the lower point on float grids) or, with a
generator, stochastic: up with probability equal to the distance from the lower point, so
the expectation is the input.
"""

from __future__ import annotations

import torch

# 4-bit float magnitudes (sign is the fourth bit). e2m1: OCP MX FP4. e3m0: powers of two
# 2^-6..2^0 and zero, the format Streaming DiLoCo sends.
FP4_GRIDS: dict[str, tuple[float, ...]] = {
    "e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    "e3m0": (0.0,) + tuple(2.0 ** e for e in range(-6, 1)),
}


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def to_blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """View a flat fp32 tensor as [num_blocks, block] rows, zero-padding the last one."""
    pad = num_blocks(flat.numel(), block) * block - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def div_scalar(t: torch.Tensor, d: float) -> torch.Tensor:
    """t / d, correctly rounded on every device: CUDA turns a division by a Python number into a
    multiplication by its reciprocal (last-bit differences from the CPU); a 0-dim device tensor is divided."""
    return t / d if t.device.type == "cpu" else t / torch.tensor(d, dtype=t.dtype, device=t.device)


def block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.abs().amax(dim=1)


def scale_rows(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x / scale per row, as a new tensor; rows with scale 0 (all-zero blocks) give 0.

    Multiplies by the reciprocal (one pass); a scale so small that its reciprocal overflows
    (block absmax below ~1e-36) gets the largest finite one, so such blocks round towards 0.
    """
    inv = torch.where(scales > 0, 1.0 / scales, 0.0).clamp_(max=torch.finfo(scales.dtype).max)
    return x * inv.unsqueeze(1)


def round_to_int_(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """In place: nearest integer (half to even), or stochastic rounding when a generator is given."""
    if generator is None:
        return x.round_()
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.add_(noise).floor_()


def _count_above(x: torch.Tensor, thresholds: list[float], inclusive: bool) -> torch.Tensor:
    """How many thresholds each value exceeds (or reaches), as uint8."""
    count = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t in thresholds:
        count.add_(x >= t if inclusive else x > t)
    return count


def round_to_grid(mag: torch.Tensor, grid: list[float], generator: torch.Generator | None) -> torch.Tensor:
    """Index (uint8) of the grid point for each magnitude in [0, grid[-1]] (grid ascending, from 0)."""
    if generator is None:
        return _count_above(mag, [(a + b) / 2 for a, b in zip(grid, grid[1:])], inclusive=False)
    lo = _count_above(mag, grid[1:-1], inclusive=True)
    points = torch.tensor(grid, dtype=mag.dtype, device=mag.device)
    low, high = points[lo.long()], points[lo.long() + 1]
    up = (mag - low) / (high - low)
    noise = torch.rand(mag.shape, generator=generator, device=mag.device, dtype=mag.dtype)
    return lo.add_(noise < up)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 in 0..15) two per byte, first code in the low nibble."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:numel]


def pack_crumbs(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes (uint8 in 0..3) four per byte, first code in the lowest two bits."""
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    q = codes.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack_crumbs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed & 3, (packed >> 2) & 3, (packed >> 4) & 3, packed >> 6], dim=1).view(-1)[:numel]


_BIT_WEIGHTS = tuple(1 << i for i in range(8))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack booleans eight per byte, first one in the lowest bit."""
    pad = (-bits.numel()) % 8
    as_bytes = bits.to(torch.uint8)
    if pad:
        as_bytes = torch.cat([as_bytes, as_bytes.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (as_bytes.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) & weights) != 0).view(-1)[:numel]


def pack_uint(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes (uint8 in 0..2^bits - 1) into ceil(n * bits / 8) bytes, little-endian
    bit order (code i's bit b is stream bit i * bits + b; stream bit s is bit s % 8 of byte s // 8)."""
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    return pack_bits(((codes.reshape(-1, 1) >> shifts) & 1).reshape(-1))


def unpack_uint(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """The inverse of `pack_uint`: `numel` codes (uint8)."""
    stream = unpack_bits(packed, numel * bits).view(numel, bits).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream << shifts).sum(dim=1, dtype=torch.uint8)
