"""PowerSGD (Vogels et al. 2019): a rank-r approximation M ~ P Q^T from one power iteration.

A tensor of shape (d0, d1, ...) is the matrix M of d0 rows and d1*... columns; it must have at
least two dimensions (a vector has no low-rank structure worth sending: send it with another
compressor, explicitly). r = min(rank, rows, cols). One step:

    P = M Q;  P = orthonormal(P);  Q = M^T P;  M ~ P Q^T

Q starts from a seeded normal draw (the same on every rank for the same key) and, with
`warm_start`, from the previous step's Q of that key. `compress` runs the step locally;
`raylane.comm.collectives.powersgd_allreduce` runs it across ranks, all-reducing P, then Q.
The reconstruction is P P^T M, a projection, so its error never exceeds ||M||.
Wire bytes: 4 * r * (rows + cols) (fp32 factors).
"""

from __future__ import annotations

import math
import zlib

import torch

from tests._reference_comm.compressors import Compressor, Payload, ShapeLike, as_shape, check_choice, check_int


def matrix_shape(shape: ShapeLike) -> tuple[int, int]:
    shape = as_shape(shape)
    if len(shape) < 2:
        raise ValueError(f"powersgd: tensor shape {tuple(shape)} has {len(shape)} dims; "
                         "PowerSGD compresses matrices (2 or more dims)")
    return shape[0], math.prod(shape[1:])


def orthonormalize(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt (each projection done twice, for orthogonality in floats) on the columns of p,
    in place; a zero column stays zero. Deterministic, so every rank gets the same bits."""
    for i in range(p.shape[1]):
        col = p[:, i]
        for _ in range(2 if i else 0):
            col -= p[:, :i] @ (p[:, :i].T @ col)
        col /= col.norm() + eps
    return p


class PowerSGD(Compressor):
    """Rank-r PowerSGD; keeps Q per key (warm start) in its state_dict."""

    name, chunkable = "powersgd", False

    def __init__(self, rank: int = 4, warm_start: bool = True, seed: int = 0):
        check_int("rank", rank, 1)
        check_choice("warm_start", warm_start, [False, True])
        check_int("seed", seed, 0)
        self.rank, self.warm_start, self.seed = rank, warm_start, seed
        self._q: dict[str, torch.Tensor] = {}

    def factor_rank(self, shape: ShapeLike) -> int:
        return min(self.rank, *matrix_shape(shape))

    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
        rows, cols = matrix_shape(shape)
        r = self.factor_rank(shape)
        return {"p": (torch.float32, rows * r), "q": (torch.float32, cols * r)}

    def start_q(self, key: str, cols: int, r: int, device: torch.device) -> torch.Tensor:
        """This step's Q for `key`: the previous one (warm start) or a seeded draw."""
        prev = self._q.get(key)
        if self.warm_start and prev is not None and prev.shape == (cols, r):
            return prev.to(device)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{key}".encode()))
        return torch.randn(cols, r, generator=gen).to(device)

    def remember(self, key: str, q: torch.Tensor) -> None:
        if self.warm_start:
            self._q[key] = q.clone()

    def _encode(self, t: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        rows, cols = matrix_shape(t.shape)
        m = t.reshape(rows, cols).float()
        p = orthonormalize(m @ self.start_q(key, cols, self.factor_rank(t.shape), t.device))
        q = m.T @ p
        self.remember(key, q)
        return {"p": p.reshape(-1), "q": q.reshape(-1)}

    def _decode(self, payload: Payload) -> torch.Tensor:
        rows, cols = matrix_shape(payload.shape)
        r = self.factor_rank(payload.shape)
        return payload.parts["p"].view(rows, r) @ payload.parts["q"].view(cols, r).T

    def state_dict(self) -> dict:
        return {"q": {k: v.clone() for k, v in self._q.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._q = {k: v.clone() for k, v in state.get("q", {}).items()}

    def __repr__(self) -> str:
        return f"powersgd(rank={self.rank}{', warm' if self.warm_start else ''})"
