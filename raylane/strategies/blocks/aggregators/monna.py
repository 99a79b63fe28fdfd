"""MoNNA (Farhadkhani et al. 2023, "Robust Collaborative Learning with Linear Gradient Overhead").

The mean of the n - f rows nearest (Euclidean, itself included, ties: lower index) to a pivot row
x_pivot that is trusted to be honest. In the paper every honest worker uses its own vector as the
pivot; with one aggregate for every rank (replicas stay identical) the pivot is one fixed row:
`pivot` (an index into the rows the rule sees: after dropped non-finite rows, bucketing or NNM it
is the pivot-th of those). Needs n > 2f; with f rows far from an honest pivot it returns the
honest mean exactly. Gram space: one pass for the distances, one to combine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylane.strategies.blocks.aggregators.base import Aggregator, Result, combine, gram, register, sq_distances
from raylane.validation import check


@dataclass
class MonnaConfig:
    pivot: int = 0          # the trusted row's index

    def validate(self, prefix: str) -> None:
        check(self.pivot >= 0, f"{prefix}.pivot", self.pivot, "must be >= 0")


@register
class Monna(Aggregator):
    name, config_cls = "monna", MonnaConfig

    @classmethod
    def check_params(cls, cfg: MonnaConfig, n: int, f: int, prefix: str) -> None:
        check(cfg.pivot < n, f"{prefix}.pivot", cfg.pivot, f"must be < cluster.num_workers={n} (a row index)")

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        n = G.shape[0]
        K = gram(G) if gram_matrix is None else gram_matrix
        p = min(self.cfg.pivot, n - 1)
        d = sq_distances(K)[p]
        nearest = sorted(sorted(range(n), key=lambda j: (float(d[j]), j))[: n - min(self.f, n - 1)])
        w = torch.zeros(n, dtype=torch.float64)
        w[nearest] = 1.0 / len(nearest)
        return Result(combine(w, G), weights=w, selected=nearest)
