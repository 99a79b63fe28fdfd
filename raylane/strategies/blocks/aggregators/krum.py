"""Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018).

- krum: score(i) = sum of squared distances from row i to its n - f - 2 nearest other rows;
  the output is the row with the lowest score (ties: the lowest index). Needs n > 2f + 2.
- multi_krum: the mean of the `m` rows with the lowest scores (m = n - f by default).
- bulyan: select theta = n - 2f rows by Krum, one at a time, each time removing the chosen row
  and re-scoring the rest; then per coordinate average the beta = theta - 2f selected values
  closest to the selected rows' coordinate-wise median. Needs n >= 4f + 3.
Distances come from the float64 Gram matrix (one pass over G).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylane.strategies.blocks.aggregators.base import (Aggregator, Result, combine, coordinate_median, gram, register,
                                                 sq_distances)
from raylane.validation import check


@dataclass
class KrumConfig:
    def validate(self, prefix: str) -> None:
        pass


@dataclass
class MultiKrumConfig:
    m: int = 0              # rows averaged; 0: n - f

    def validate(self, prefix: str) -> None:
        check(self.m >= 0, f"{prefix}.m", self.m, "must be >= 1, or 0 for n - f")


@dataclass
class BulyanConfig:
    def validate(self, prefix: str) -> None:
        pass


def krum_scores(D: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row of the squared-distance matrix D (n x n) for f Byzantine rows."""
    n = D.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=D.dtype)
    k = max(1, n - f - 2)   # >= 1 also in Bulyan's last rounds, where n - f - 2 may reach 0
    others = D + torch.diag(torch.full((n,), float("inf"), dtype=D.dtype))  # exclude self
    return others.sort(dim=1).values[:, :k].sum(dim=1)


def lowest(scores: torch.Tensor, m: int) -> list[int]:
    """Indices of the m lowest scores, ties broken by the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return order[:m]


@register
class Krum(Aggregator):
    name, config_cls = "krum", KrumConfig

    @classmethod
    def min_workers(cls, cfg, f: int) -> tuple[int, str]:
        return 2 * f + 3, "n > 2f + 2"

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        K = gram(G) if gram_matrix is None else gram_matrix
        scores = krum_scores(sq_distances(K), self.f)
        (i,) = lowest(scores, 1)
        w = torch.zeros(G.shape[0], dtype=torch.float64)
        w[i] = 1.0
        return Result(G[i].clone(), weights=w, selected=[i])


@register
class MultiKrum(Krum):  # Krum's row bound; averages the m best-scored rows instead of taking one
    name, config_cls = "multi_krum", MultiKrumConfig

    @classmethod
    def check_params(cls, cfg: MultiKrumConfig, n: int, f: int, prefix: str) -> None:
        check(cfg.m <= n, f"{prefix}.m", cfg.m, f"must be <= cluster.num_workers={n} (rows averaged), or 0 for n - f")

    def required_rows(self) -> int:
        return max(2 * self.f + 3, self.cfg.m)

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        n = G.shape[0]
        m = self.cfg.m or n - self.f
        if not 1 <= m <= n:
            raise ValueError(f"multi_krum: m={m} must be in [1, n={n}]")
        K = gram(G) if gram_matrix is None else gram_matrix
        chosen = sorted(lowest(krum_scores(sq_distances(K), self.f), m))
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = 1.0 / m
        return Result(combine(w, G), weights=w, selected=chosen)


@register
class Bulyan(Aggregator):
    name, config_cls = "bulyan", BulyanConfig

    @classmethod
    def min_workers(cls, cfg, f: int) -> tuple[int, str]:
        return 4 * f + 3, "n >= 4f + 3"

    def select(self, D: torch.Tensor) -> list[int]:
        """theta = n - 2f rows, chosen by Krum one at a time from what is left."""
        left, chosen = list(range(D.shape[0])), []
        for _ in range(D.shape[0] - 2 * self.f):
            sub = D[left][:, left]
            (j,) = lowest(krum_scores(sub, self.f), 1)
            chosen.append(left.pop(j))
        return sorted(chosen)

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        K = gram(G) if gram_matrix is None else gram_matrix
        chosen = self.select(sq_distances(K))
        S = G[chosen]
        beta = len(chosen) - 2 * self.f
        med = coordinate_median(S)
        closest = (S - med).abs().topk(beta, dim=0, largest=False, sorted=False).indices
        return Result(S.gather(0, closest).mean(dim=0), selected=chosen, info={"beta": float(beta)})
