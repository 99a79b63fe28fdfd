"""Blockwise int / fp4 payloads encoded straight into, and decoded straight out of, flat byte buffers.

The quantized allreduce's fast path (`raylane.comm.collectives`) for `IntQuantizer` (nearest or
stochastic rounding) and `FP4Quantizer` (nearest) on fp32 tensors, with block sizes that are a
multiple of 8 (so every chunk's parts stay aligned in the flat buffers). A payload is the
quantizer's own layout, `[scales fp32 | codes]`, byte for byte what `compress(...).to_bytes()`
gives, computed by `raylane.comm.kernels` with no tensor at the data's size allocated per call:
whole blocks go through the kernels in place; a partial last block is padded in a one-block buffer.
Scratch comes from a `Workspace` under the names "codec.*".
"""

from __future__ import annotations

import torch

from raylane.comm import kernels
from raylane.comm.compressors import Compressor
from raylane.comm.quantizers import FP4Quantizer, IntQuantizer
from raylane.comm.workspace import Workspace


class BlockCodec:
    """Encode / decode one quantizer's payloads into / from byte buffers."""

    def __init__(self, c: IntQuantizer | FP4Quantizer, ws: Workspace):
        self.c, self.ws, self.block = c, ws, c.block_size
        self.bits = c.bits if isinstance(c, IntQuantizer) else 4

    @staticmethod
    def fits(c: Compressor, t: torch.Tensor) -> bool:
        if t.dtype != torch.float32 or getattr(c, "block_size", 1) % 8:
            return False
        return type(c) is IntQuantizer or (type(c) is FP4Quantizer and not c.stochastic)

    def _scratch(self, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        return self.ws.get(f"codec.{name}", numel, dtype, device)

    def _code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else -(-numel // 2)

    def _parts(self, buf: torch.Tensor, numel: int, write: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scales, codes, raw): scales as fp32, read in place when the buffer is 4-byte aligned, else
        in a scratch copy whose bytes `raw` (the buffer's) must be copied to / from. Scales to be
        written always go through the scratch (1/block of the data): a kernel that writes an fp32 view
        and a byte view of one buffer makes torch.compile merge them into one synthetic base, which
        fails whenever the payload's size is not a multiple of 4 (an odd count of fp4 codes)."""
        nb = -(-numel // self.block)
        raw, codes = buf[:4 * nb], buf[4 * nb:4 * nb + self._code_bytes(numel)]
        if raw.storage_offset() % 4 == 0 and not write:
            return raw.view(torch.float32), codes, None
        return self._scratch("scales", nb, torch.float32, buf.device), codes, raw

    # -- encode ----------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, buf: torch.Tensor) -> None:
        """Payload of the flat fp32 `src` into `buf` (its exact size); raises on inf or nan."""
        n, b = src.numel(), self.block
        if n == 0:
            return
        scales, codes, raw = self._parts(buf, n, write=True)
        full, rest = divmod(n, b)
        gen = self.c._generator(src.device)
        noise = None
        if gen is not None:  # one draw per payload, padded blocks included, as the reference path
            noise = self._scratch("noise", (full + (rest > 0)) * b, torch.float32, src.device)
            noise.uniform_(generator=gen)
        if full:
            self._encode_blocks(src[:full * b].view(full, b), scales[:full], codes[:self._code_bytes(full * b)],
                                None if noise is None else noise[:full * b].view(full, b))
        if rest:
            pad = self._scratch("pad", b, torch.float32, src.device).zero_()
            pad[:rest].copy_(src[full * b:])
            tail = self._scratch("tail", self._code_bytes(b), torch.uint8, src.device)
            self._encode_blocks(pad.view(1, b), scales[full:], tail,
                                None if noise is None else noise[full * b:].view(1, b))
            got = codes[self._code_bytes(full * b):]
            got.copy_(tail[:got.numel()])
            if self.bits == 4 and rest % 2:
                got[-1:].bitwise_and_(0x0F)  # the reference pads an odd count with a zero nibble
        if raw is not None:
            raw.copy_(scales.view(torch.uint8))
        if not bool(torch.isfinite(scales).all()):
            raise ValueError(f"{self.c.name}: tensor of shape {(n,)} has inf or nan values; "
                             "compressors take finite tensors only")

    def _encode_blocks(self, x, scales, codes, noise) -> None:
        n, dev = x.numel(), x.device
        scratch = _Lazy(self, n, dev)
        if self.bits == 8 and isinstance(self.c, IntQuantizer):
            kernels.encode_int(x, self.c.qmax, 8, noise, scales, codes.view(torch.int8), scratch.f32, scratch.i32)
        elif isinstance(self.c, IntQuantizer):
            kernels.encode_int(x, self.c.qmax, 4, noise, scales, codes, scratch.f32, scratch.i32)
        else:
            kernels.encode_fp4(x, self.c.grid, scales, codes, scratch.f32, scratch.i32)

    # -- decode ----------------------------------------------------------------------------
    def decode(self, buf: torch.Tensor, numel: int, out: torch.Tensor, accumulate: bool) -> None:
        """Write (or with `accumulate`, add) the reconstruction of a payload of `numel` values into
        the flat fp32 `out`; a partial last block goes through a one-block buffer."""
        b = self.block
        if numel == 0:
            return
        scales, codes, raw = self._parts(buf, numel)
        if raw is not None:
            scales.view(torch.uint8).copy_(raw)
        full, rest = divmod(numel, b)
        if full:
            self._decode_blocks(codes[:self._code_bytes(full * b)], scales[:full], out[:full * b].view(full, b),
                                accumulate)
        if rest:
            tail = self._scratch("tail", self._code_bytes(b), torch.uint8, buf.device).zero_()
            got = codes[self._code_bytes(full * b):]
            tail[:got.numel()].copy_(got)
            row = self._scratch("pad", b, torch.float32, buf.device)
            if accumulate:
                row[:rest].copy_(out[full * b:])
            self._decode_blocks(tail, scales[full:], row.view(1, b), accumulate)
            out[full * b:].copy_(row[:rest])

    def _decode_blocks(self, codes, scales, out, accumulate: bool) -> None:
        scratch = _Lazy(self, out.numel(), out.device)
        if isinstance(self.c, IntQuantizer):
            kernels.decode_int(codes, scales, self.bits, out, accumulate, scratch.f32, scratch.i32)
        else:
            kernels.decode_fp4(codes, scales, self.c.grid, out, accumulate, scratch.f32, scratch.i32)


class _Lazy:
    """The eager kernels' scratch buffers, taken from the workspace only if the eager path runs."""

    def __init__(self, codec: BlockCodec, numel: int, device):
        self._codec, self._numel, self._device = codec, numel, device

    def f32(self) -> torch.Tensor:
        return self._codec._scratch("f32", self._numel, torch.float32, self._device)

    def i32(self) -> torch.Tensor:
        return self._codec._scratch("i32", self._numel, torch.int32, self._device)


def payload_bytes(c: Compressor, numel: int) -> int:
    return c.payload_bytes((numel,), torch.float32) if numel else 0

