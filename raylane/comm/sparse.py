"""Sparsifiers: top-k (values + indices) and random-k (values + the seed that regenerates the indices).

k = round(ratio * n), at least 1 for a non-empty tensor, at most n. Kept values are exact (in
the tensor's dtype); dropped ones decode as 0, so the error of each value is 0 or |x|.
Neither rescales: pair them with error feedback (`raylane.comm.error_feedback`).

Wire bytes: top-k k * (itemsize + index bytes), index int32 below 2^31 values, else int64;
random-k k * itemsize + 8 (the int64 seed).
"""

from __future__ import annotations

import math
import zlib

import torch

from raylane.comm.compressors import Compressor, Payload, ShapeLike, as_shape, check_fraction, check_int


def kept(numel: int, ratio: float) -> int:
    return min(numel, max(1, round(ratio * numel))) if numel else 0


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2 ** 31 else torch.int64


_SAMPLE = 1 << 16
_SAMPLE_POSITIONS: dict[tuple[int, str], torch.Tensor] = {}


def _sample_positions(n: int, device: torch.device) -> torch.Tensor:
    """65,536 fixed pseudo-random positions in [0, n) (seeded; kept per size and device): a strided
    sample would see only a few columns of a gradient whose row length divides the stride."""
    key = (n, str(device))
    if key not in _SAMPLE_POSITIONS:
        if len(_SAMPLE_POSITIONS) > 64:
            _SAMPLE_POSITIONS.clear()
        gen = torch.Generator().manual_seed(n)
        _SAMPLE_POSITIONS[key] = torch.randint(n, (_SAMPLE,), generator=gen).to(device)
    return _SAMPLE_POSITIONS[key]


def top_indices(magnitudes: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest of a flat tensor; the same set as `topk` (ties at the k-th value
    aside), faster: a threshold from a random sample keeps ~1.25 k candidates (if the sample misleads,
    a threshold keeping ~4 times as many), and topk runs on those; if still fewer than k, plain topk
    over everything. `mask`: an optional bool buffer of n for the candidate test (else one is allocated).
    """
    n = magnitudes.numel()
    if n <= _SAMPLE or 2 * k > n:
        return magnitudes.topk(k, sorted=False).indices
    sample = magnitudes[_sample_positions(n, magnitudes.device)]
    for margin in (1.25, 5.0):
        keep = min(sample.numel(), math.ceil(margin * sample.numel() * k / n) + 1)
        threshold = sample.topk(keep, sorted=True).values[-1]
        above = magnitudes >= threshold if mask is None else torch.ge(magnitudes, threshold, out=mask)
        candidates = above.nonzero().squeeze(1)
        if candidates.numel() >= k:
            return candidates[magnitudes[candidates].topk(k, sorted=False).indices]
    return magnitudes.topk(k, sorted=False).indices


def _scatter(values: torch.Tensor, index: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    out[index.long()] = values.float()
    return out


class TopK(Compressor):
    """Keep the k values of largest magnitude."""

    name = "topk"

    def __init__(self, ratio: float = 0.01):
        check_fraction("ratio", ratio)
        self.ratio = ratio

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        n = math.prod(as_shape(shape))
        k = kept(n, self.ratio)
        return {"indices": (index_dtype(n), k), "values": (dtype, k)}

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        return self.encode_with(t.reshape(-1), t.reshape(-1).float().abs())

    def encode_with(self, flat: torch.Tensor, magnitudes: torch.Tensor,
                    mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The parts of flat's payload, given |flat| in fp32 (and a bool buffer), e.g. in reused buffers."""
        index = top_indices(magnitudes, kept(flat.numel(), self.ratio), mask)
        return {"indices": index.to(index_dtype(flat.numel())), "values": flat[index]}

    def _decode(self, payload: Payload) -> torch.Tensor:
        return _scatter(payload.parts["values"], payload.parts["indices"], payload.numel)

    def __repr__(self) -> str:
        return f"topk(ratio={self.ratio})"


class RandomK(Compressor):
    """Keep k values at random positions. The positions come from a seed that travels with the
    values (8 bytes); the seed is drawn from (seed, key, call count), so ranks that compress
    the same keys in the same order pick the same positions and their values can be summed.
    """

    name = "randomk"

    def __init__(self, ratio: float = 0.01, seed: int = 0):
        check_fraction("ratio", ratio)
        check_int("seed", seed, 0)
        self.ratio, self.seed = ratio, seed
        self._calls: dict[str, int] = {}
        self._last: tuple | None = None  # ((seed, numel, device), positions) of the last call

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        return {"seed": (torch.int64, 1), "values": (dtype, kept(math.prod(as_shape(shape)), self.ratio))}

    def positions(self, call_seed: int, numel: int, device: torch.device) -> torch.Tensor:
        """The k positions for one call: a CPU permutation prefix, the same on every device. The last
        call's are kept (k int64), so that one collective draws its permutation once, not per payload."""
        key = (call_seed, numel, str(device))
        if self._last is None or self._last[0] != key:
            gen = torch.Generator().manual_seed(call_seed)
            self._last = (key, torch.randperm(numel, generator=gen)[:kept(numel, self.ratio)].to(device))
        return self._last[1]

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        count = self._calls.get(key, 0)
        self._calls[key] = count + 1
        call_seed = zlib.crc32(f"{self.seed}/{key}/{count}".encode())
        flat = t.reshape(-1)
        values = flat[self.positions(call_seed, flat.numel(), t.device)]
        return {"seed": torch.tensor([call_seed], dtype=torch.int64, device=t.device), "values": values}

    def _decode(self, payload: Payload) -> torch.Tensor:
        values = payload.parts["values"]
        index = self.positions(int(payload.parts["seed"].item()), payload.numel, values.device)
        return _scatter(values, index, payload.numel)

    def state_dict(self) -> dict:
        return {"calls": dict(self._calls)}

    def load_state_dict(self, state: dict) -> None:
        self._calls = dict(state.get("calls", {}))

    def __repr__(self) -> str:
        return f"randomk(ratio={self.ratio}, seed={self.seed})"
