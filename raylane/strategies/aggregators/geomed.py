"""Geometric median by the smoothed Weiszfeld algorithm, as RFA (Pillutla et al. 2022).

v = argmin_v sum_i alpha_i max(nu, |v - g_i|) with alpha_i = 1/n, iterated from the mean:
v <- sum_i beta_i g_i / sum_i beta_i, beta_i = alpha_i / max(nu, |v - g_i|), until the
objective's relative change is below `ftol` or `max_iters` iterations. The iterate is always a
convex combination of the rows, so it runs on their coefficients in the Gram space. With f < n/2
rows arbitrary, the geometric median stays within a constant times the honest rows' spread of
the honest rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylane.strategies.aggregators.base import Aggregator, Result, combine, gram, register
from raylane.validation import check


@dataclass
class GeoMedConfig:
    max_iters: int = 100
    nu: float = 1.0e-6       # smoothing: distances below nu count as nu
    ftol: float = 1.0e-10    # stop when the objective changes by less than this (relative)

    def validate(self, prefix: str) -> None:
        check(self.max_iters >= 1, f"{prefix}.max_iters", self.max_iters, "must be >= 1")
        check(self.nu > 0, f"{prefix}.nu", self.nu, "must be > 0")
        check(self.ftol >= 0, f"{prefix}.ftol", self.ftol, "must be >= 0")


def distances(K: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """|v - g_i| for v = c @ G, from the Gram matrix."""
    Kc = K @ c
    return (c @ Kc - 2 * Kc + K.diagonal()).clamp(min=0).sqrt()


def weiszfeld(K: torch.Tensor, cfg: GeoMedConfig) -> tuple[torch.Tensor, int]:
    """Coefficients of the smoothed geometric median, and the iterations taken."""
    n = K.shape[0]
    c = torch.full((n,), 1.0 / n, dtype=torch.float64)
    obj = float((distances(K, c).clamp(min=cfg.nu) / n).sum())
    for it in range(1, cfg.max_iters + 1):
        beta = (1.0 / n) / distances(K, c).clamp(min=cfg.nu)
        c = beta / beta.sum()
        new = float((distances(K, c).clamp(min=cfg.nu) / n).sum())
        if abs(obj - new) <= cfg.ftol * max(new, 1e-300):
            return c, it
        obj = new
    return c, cfg.max_iters


@register
class GeometricMedian(Aggregator):
    name, config_cls = "geomed", GeoMedConfig

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        K = gram(G) if gram_matrix is None else gram_matrix
        c, iters = weiszfeld(K, self.cfg)
        return Result(combine(c, G), weights=c, info={"iters": float(iters)})
