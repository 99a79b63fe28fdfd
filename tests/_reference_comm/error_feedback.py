"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019) around any lossy compressor.

Per key, it keeps the residual: what was meant to be sent but was not. Each call compresses
`t + residual` and keeps `(t + residual) - decompress(payload)` (in fp32) for the next call, so
nothing is lost for good, only delayed. Residuals are part of `state_dict()` and survive a
restart. A tensor must keep its shape under its key. Payloads are the inner compressor's, so a
receiver decompresses them with either.
"""

from __future__ import annotations

import torch

from tests._reference_comm.compressors import Compressor, Payload, ShapeLike


class ErrorFeedback(Compressor):
    """Wraps `inner`; same payloads, same bytes, plus a residual per key."""

    def __init__(self, inner: Compressor):
        if isinstance(inner, ErrorFeedback):
            raise ValueError(f"error_feedback: {inner.name} already has error feedback")
        self.inner, self.name = inner, f"ef({inner.name})"
        self.lossless, self.fixed_size = inner.lossless, inner.fixed_size
        self.chunkable, self.align = inner.chunkable, inner.align
        self.residuals: dict[str, torch.Tensor] = {}

    def corrected(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """t + residual of `key`, in fp32."""
        residual = self.residuals.get(key)
        if residual is None:
            return t.detach().float()
        if residual.shape != t.shape:
            raise ValueError(f"{self.name}: key {key!r} had shape {tuple(residual.shape)}, "
                             f"now {tuple(t.shape)}; use one key per tensor")
        return t.detach().float() + residual.to(t.device)

    def keep(self, key: str, corrected: torch.Tensor, sent: torch.Tensor) -> None:
        """Remember what `sent` (its reconstruction) left out of `corrected`."""
        self.residuals[key] = corrected - sent.float()

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        corrected = self.corrected(t, key)
        payload = self.inner.compress(corrected.to(t.dtype), key)
        self.keep(key, corrected, self.inner.decompress(payload))
        return payload.parts

    def _decode(self, payload: Payload) -> torch.Tensor:
        return self.inner.decompress(payload)

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        return self.inner.layout(shape, dtype)

    def payload_bytes(self, shape: ShapeLike, dtype: torch.dtype) -> int:
        return self.inner.payload_bytes(shape, dtype)

    def expected_ratio(self, shape: ShapeLike, dtype: torch.dtype) -> float:
        return self.inner.expected_ratio(shape, dtype)

    def from_bytes(self, buf: torch.Tensor, shape: ShapeLike, dtype: torch.dtype) -> Payload:
        return self.inner.from_bytes(buf, shape, dtype)

    def state_dict(self) -> dict:
        return {"residuals": {k: v.clone() for k, v in self.residuals.items()}, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}
        self.inner.load_state_dict(state.get("inner", {}))

    def __repr__(self) -> str:
        return f"ef({self.inner!r})"
