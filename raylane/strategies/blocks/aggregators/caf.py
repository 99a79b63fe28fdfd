"""CAF, the covariance-bound agnostic filter (Allouah, Guerraoui and Stephan, as the ByzFL library
defines it): the spectral filter of Diakonikolas et al. (2017) without a known bound on the honest
rows' covariance, keeping the candidate mean whose weighted covariance has the smallest top eigenvalue.

Weights c_i = 1. While sum_i c_i > n - 2f:
  mu_c = sum c_i g_i / sum c_i;  Sigma_c = sum c_i (g_i - mu_c)(g_i - mu_c)ᵀ / sum c_i;
  (lambda, v) = the top eigenpair of Sigma_c; keep mu_c if lambda is the smallest seen so far;
  tau_i = (vᵀ(g_i - mu_c))²;  c_i <- c_i (1 - tau_i / max_{j: c_j > 0} tau_j).
Output: the mu_c with the smallest lambda. The maximum runs over the rows still weighted: a removed
row keeps a tau (a far one the largest), and dividing by it would leave the others' weights almost
unchanged pass after pass; over the live rows each pass zeroes one more, so the filter ends within
2f + 1 passes. Needs n > 2f. Exact top eigenpair in the n x n Gram
space: Sigma_c's non-zero spectrum is that of D^(1/2) P K Pᵀ D^(1/2) (D = diag(c / sum c),
P = I - 1 cᵀ / sum c: row i of P G is g_i - mu_c), and vᵀ(g_i - mu_c) = (P K Pᵀ D^(1/2) u)_i / sqrt(lambda).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylane.strategies.blocks.aggregators.base import Aggregator, Result, combine, gram, register


@dataclass
class CafConfig:
    def validate(self, prefix: str) -> None:
        pass


def caf_weights(K: torch.Tensor, f: int) -> tuple[torch.Tensor, int]:
    """Coefficients (on the rows) of CAF's output, and the filter passes taken."""
    n = K.shape[0]
    c = torch.ones(n, dtype=torch.float64)
    best, best_w, passes = float("inf"), torch.full((n,), 1.0 / n, dtype=torch.float64), 0
    while float(c.sum()) > n - 2 * f and passes <= n:
        w = c / c.sum()
        P = torch.eye(n, dtype=torch.float64) - w[None, :]
        Kc = P @ K @ P.T                                  # Gram of the centered rows
        s = w.sqrt()
        evals, U = torch.linalg.eigh(s[:, None] * Kc * s[None, :])
        lam, u = float(evals[-1]), U[:, -1]
        passes += 1
        if lam < best:
            best, best_w = lam, w.clone()
        if lam <= 0:
            break
        tau = (Kc @ (s * u)) ** 2 / lam
        c = c * (1 - tau / tau[c > 0].max())
        c = c.clamp(min=0)
    return best_w, passes


@register
class Caf(Aggregator):
    name, config_cls = "caf", CafConfig

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        K = gram(G) if gram_matrix is None else gram_matrix
        w, passes = caf_weights(K, self.f)
        return Result(combine(w, G), weights=w, info={"passes": float(passes)})
