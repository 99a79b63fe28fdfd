"""The Flag Aggregator (Almasi et al., ICLR 2024), solved by IRLS in the n x n Gram space.

Each gradient is normalised, x_i = g_i / |g_i| (a zero row stays zero). The aggregator seeks the
subspace Y (d x r, orthonormal) that minimises the flag-median objective sum_i sqrt(1 - |Yᵀx_i|²)
plus an optional pairwise term. FlagIRLS, as the authors' reference (`irls_flag` with the 'sine'
weight) does it: repeat `max_iters` times Y <- the top r left singular vectors of [a_i x_i],
a_i = (|1 - |Yᵀx_i|²| + eps)^(-1/4); with `lam` > 0 the columns a_ij (x_i - x_j) for every ordered
pair i != j join them, a_ij = (|1 - |Yᵀ(x_i - x_j)|²| + eps)^(-1/4) lam / (n (n - 1)). The loop
stops early when the objective stops decreasing by more than 1e-10 (then the previous Y is kept
if the last one was worse). The reference starts from a random Y; in high dimension a random Y is
orthogonal to the data, every first weight is (1 + eps)^(-1/4), so we start from exactly those
equal weights: the same first iterate, with no RNG.

Every Y lies in the span of the x_i: Y = X A. With the normalised Gram matrix Kn = V Λ Vᵀ,
the left singular vectors of X B^(1/2) (B = Σ columns' outer products, n x n) are X V Λ^(-1/2) P,
P the top eigenvectors of Λ^(1/2) Vᵀ B V Λ^(1/2); Yᵀ x_i is (Aᵀ Kn)[:, i]. All of it is float64
and n x n: the cost is the Gram pass and the final combination.

Output (`rescale`):
- `none`: the reference's and paper's output, Y Yᵀ Σ_i x_i / r (its norm is up to n / r: the
  magnitude of the gradients is thrown away);
- `median_norm` (default): median_i |g_i| · Y Yᵀ mean_i(x_i) — equal to g when all rows are g,
  so learning rates mean what they mean for the mean; the median norm is robust to f < n/2 rows.
`weights` are the coefficients of the output on the raw rows; `info` carries the last IRLS
weights a_i (normalised to sum 1) and the iterations taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylane.strategies.blocks.aggregators.base import Aggregator, Result, combine, gram, register
from raylane.validation import check, one_of

RESCALE = ("median_norm", "none")
TOL = 1e-10          # the reference's stopping threshold on the objective


@dataclass
class FlagConfig:
    r: int = 1               # columns of Y (the subspace's dimension)
    lam: float = 0.0         # pairwise regulariser lambda (0: off)
    max_iters: int = 4       # IRLS iterations (the reference's n_its)
    eps: float = 1.0e-7      # weight perturbation (the reference's eps)
    rescale: str = "median_norm"   # median_norm | none (the paper's)

    def validate(self, prefix: str) -> None:
        check(self.r >= 1, f"{prefix}.r", self.r, "must be >= 1")
        check(self.lam >= 0, f"{prefix}.lam", self.lam, "must be >= 0")
        check(self.max_iters >= 1, f"{prefix}.max_iters", self.max_iters, "must be >= 1")
        check(self.eps > 0, f"{prefix}.eps", self.eps, "must be > 0")
        one_of(f"{prefix}.rescale", self.rescale, RESCALE)


def _basis(Kn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, sqrt(Λ)) of the normalised Gram matrix, numerically zero eigenvalues dropped."""
    lam, V = torch.linalg.eigh(Kn)
    keep = lam > lam.max().clamp(min=0) * 1e-12
    if not bool(keep.any()):
        return V[:, :0], lam[:0]
    return V[:, keep], lam[keep].sqrt()


def _pair_matrix(w_pair: torch.Tensor) -> torch.Tensor:
    """Σ_{i != j} w_ij² (e_i - e_j)(e_i - e_j)ᵀ for a symmetric weight matrix (zero diagonal)."""
    W2 = w_pair ** 2
    return torch.diag(W2.sum(dim=1) * 2) - 2 * W2


class _Irls:
    def __init__(self, Kn: torch.Tensor, cfg: FlagConfig):
        self.Kn, self.cfg, self.n = Kn, cfg, Kn.shape[0]
        self.V, self.sig = _basis(Kn)
        self.live = Kn.diagonal() > 0.5   # non-zero rows (normalised: diagonal 1)

    def subspace(self, B: torch.Tensor) -> torch.Tensor:
        """A (n x r'): Y = X A spans the top r left singular vectors of X B^(1/2)."""
        S = self.sig[:, None] * (self.V.T @ B @ self.V) * self.sig[None, :]
        evals, P = torch.linalg.eigh(S)
        k = min(self.cfg.r, P.shape[1])
        top = P[:, P.shape[1] - k:].flip(1)
        return self.V @ (top / self.sig[:, None])

    def cos2(self, A: torch.Tensor) -> torch.Tensor:
        """|Yᵀ x_i|² for every row."""
        return ((A.T @ self.Kn) ** 2).sum(dim=0)

    def objective(self, cos2: torch.Tensor) -> float:
        return float((1 - cos2[self.live]).clamp(min=0).sqrt().sum())

    def weights(self, A: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, a): the weighted outer-product matrix for the next iterate, and the data weights."""
        cfg, n = self.cfg, self.n
        proj = torch.zeros(self.n, self.n, dtype=torch.float64) if A is None else A.T @ self.Kn   # r x n
        a = ((1 - (proj ** 2).sum(dim=0)).abs() + cfg.eps) ** -0.25
        a = torch.where(self.live, a, torch.zeros_like(a))
        B = torch.diag(a ** 2)
        if cfg.lam > 0 and n > 1:
            diff2 = ((proj[:, :, None] - proj[:, None, :]) ** 2).sum(dim=0)        # |Yᵀ(x_i - x_j)|²
            w_pair = ((1 - diff2).abs() + cfg.eps) ** -0.25 * (cfg.lam / (n * (n - 1)))
            w_pair = w_pair * (self.live[:, None] & self.live[None, :])
            w_pair.fill_diagonal_(0)
            B = B + _pair_matrix(w_pair)
        return B, a

    def run(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A, the data weights that gave it, iterations), stopping as the reference does."""
        err_prev = float(self.live.sum())          # the objective at a Y orthogonal to the data
        cur = old = (None, None)
        it, diff = 0, 1.0
        while it < self.cfg.max_iters and diff > TOL and err_prev > TOL:
            B, a = self.weights(cur[0])
            A = self.subspace(B)
            err = self.objective(self.cos2(A))
            diff, err_prev, it = err_prev - err, err, it + 1
            old, cur = cur, (A, a)
        A, a = cur if diff > 0 or old[0] is None else old
        return A, a, it


@register
class Flag(Aggregator):
    name, config_cls = "flag", FlagConfig

    @classmethod
    def check_params(cls, cfg: FlagConfig, n: int, f: int, prefix: str) -> None:
        check(cfg.r <= n, f"{prefix}.r", cfg.r, f"must be <= cluster.num_workers={n} (the subspace's dimension)")

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        n = G.shape[0]
        K = gram(G) if gram_matrix is None else gram_matrix
        norms = K.diagonal().clamp(min=0).sqrt()
        inv = torch.where(norms > 0, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))
        Kn = inv[:, None] * K * inv[None, :]
        if not bool((norms > 0).any()):
            return Result(torch.zeros_like(G[0]), weights=torch.zeros(n, dtype=torch.float64))
        A, a, iters = _Irls(Kn, self.cfg).run()
        coef = A @ (A.T @ Kn.sum(dim=1))                # Y Yᵀ Σ x_i, on the normalised rows
        if self.cfg.rescale == "none":
            coef = coef / self.cfg.r
        else:
            coef = coef / n * norms.median()
        w = coef * inv
        share = a / a.sum() if float(a.sum()) > 0 else a
        info = {"iters": float(iters), **{f"flag_weight/rank{i}": float(s) for i, s in enumerate(share)}}
        return Result(combine(w, G), weights=w, info=info)
