"""Nearest-neighbour mixing (Allouah et al. 2023): a pre-aggregation step usable before any rule.

Each row is replaced by the average of its n - f nearest rows (itself included, Euclidean
distance, ties by index): G' = M G with M an n x n row-stochastic matrix. The aggregator then
runs on G'; its Gram matrix M K Mᵀ is handed on, so Gram-space rules need no second pass over G.
A linear rule's weights on G' become Mᵀ w on the original rows.
"""

from __future__ import annotations

import torch

from raylane.strategies.blocks.aggregators.base import Aggregator, Result, gram, sq_distances


def mixing_matrix(K: torch.Tensor, f: int) -> torch.Tensor:
    """M (n x n, float64): row i averages the n - f rows nearest to row i."""
    n = K.shape[0]
    D = sq_distances(K)
    M = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        order = sorted(range(n), key=lambda j: (float(D[i, j]), j))[: n - f]
        M[i, order] = 1.0 / (n - f)
    return M


class NNM:
    """Wraps an aggregator: mix, then aggregate the mixed rows."""

    def __init__(self, inner: Aggregator, f: int):
        self.inner, self.f = inner, f
        self.stateful = inner.stateful

    def required_rows(self) -> int:
        return max(self.inner.required_rows(), 2 * self.f + 1)

    def __call__(self, G: torch.Tensor, state=None, gram_matrix=None) -> Result:
        K = gram(G) if gram_matrix is None else gram_matrix
        M = mixing_matrix(K, self.f)
        mixed = M.to(G.dtype) @ G
        res = self.inner(mixed, state, M @ K @ M.T)
        if res.weights is not None:
            res.weights = M.T @ res.weights
        return res
