"""Mean, coordinate-wise median and coordinate-wise trimmed mean.

- mean: the average; no robustness (one row can move it anywhere).
- median (Yin et al. 2018): per coordinate, the median of the n values (mean of the two
  middle ones for even n); with f < n/2 outliers each coordinate stays within the honest
  values' range.
- trimmed_mean (Yin et al. 2018): per coordinate, drop the `trim` largest and smallest
  values (default trim = f) and average the rest; also within the honest range.
- meamed (mean around median; Xie, Koyejo and Gupta 2018, "Generalized Byzantine-tolerant SGD"):
  per coordinate, the mean of the n - f values closest to the coordinate's median (ties: the
  lower row index). Needs n > 2f; with f values far away it is the honest values' mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylane.strategies.blocks.aggregators.base import Aggregator, Result, coordinate_median, mean_rows, register
from raylane.validation import check


@dataclass
class MeanConfig:
    def validate(self, prefix: str) -> None:
        pass


@dataclass
class MedianConfig:
    def validate(self, prefix: str) -> None:
        pass


@dataclass
class TrimmedMeanConfig:
    trim: int = -1          # values dropped at each end per coordinate; -1: f

    def validate(self, prefix: str) -> None:
        check(self.trim >= -1, f"{prefix}.trim", self.trim, "must be >= 0, or -1 for f")


@register
class Mean(Aggregator):
    name, config_cls = "mean", MeanConfig

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        n = G.shape[0]
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        return Result(mean_rows(G), weights=w)


@dataclass
class MeamedConfig:
    def validate(self, prefix: str) -> None:
        pass


@register
class Meamed(Aggregator):
    name, config_cls = "meamed", MeamedConfig

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        n = G.shape[0]
        keep = n - min(self.f, n - 1)
        dist = (G - coordinate_median(G)).abs()
        order = dist.argsort(dim=0, stable=True)[:keep]
        return Result(G.gather(0, order).mean(dim=0))


@register
class Median(Aggregator):
    name, config_cls = "median", MedianConfig

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        return Result(coordinate_median(G))


@register
class TrimmedMean(Aggregator):
    name, config_cls = "trimmed_mean", TrimmedMeanConfig

    @classmethod
    def min_workers(cls, cfg: TrimmedMeanConfig, f: int) -> tuple[int, str]:
        b = f if cfg.trim < 0 else max(cfg.trim, f)
        return 2 * b + 1, f"n > 2 * max(trim, f) = {2 * b}"

    def trim_count(self) -> int:
        return self.f if self.cfg.trim < 0 else self.cfg.trim

    def __call__(self, G, state=None, gram_matrix=None) -> Result:
        n, b = G.shape[0], self.trim_count()
        if n - 2 * b < 1:
            raise ValueError(f"trimmed_mean: trimming {b} of {n} values at each end leaves none")
        if b == 0:  # nothing trimmed: the mean, a linear rule (its weights say so to the caller)
            return Result(mean_rows(G), weights=torch.full((n,), 1.0 / n, dtype=torch.float64),
                          info={"trimmed_per_side": 0.0})
        s = G.sort(dim=0).values
        return Result(s[b:n - b].mean(dim=0), info={"trimmed_per_side": float(b)})
