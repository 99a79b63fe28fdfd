"""The robust strategy's aggregation pipeline: [bucketing ->] [NNM ->] rule, built per f.

- Bucketing (Karimireddy, He and Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous
  Datasets via Bucketing"): the rows are shuffled and averaged in buckets of `s` (the last one may
  be smaller); the rest of the pipeline sees ceil(n / s) bucket means, at most f of them touched by
  a Byzantine row. The shuffle is drawn from a generator seeded with (seed, round): `round` is the
  pipeline's state (kept in the strategy's state_dict like the rule's own), so every rank draws the
  same shuffle and a resumed run the same sequence. A linear rule's weights map back to the rows.
- NNM (nnm.py) then the rule (registry()).

`Pipeline(name, cfg, f, nnm, bucket_size, seed).at(f')` is the composed aggregator for f' (the
strategy lowers f by the rows it dropped as non-finite); `required_rows(f')` the fewest rows it
accepts. `check(n, prefix)` raises a one-line ConfigError for any bound that n rows violate.
"""

from __future__ import annotations

from typing import Any

import torch

from raylane.strategies.blocks.aggregators.base import build, registry
from raylane.strategies.blocks.aggregators.nnm import NNM
from raylane.validation import check


def bucket_matrix(n: int, s: int, seed: int, rnd: int) -> torch.Tensor:
    """B (ceil(n/s) x n, float64): row b averages the rows of bucket b of a seeded shuffle."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + rnd)).tolist()
    buckets = [perm[i:i + s] for i in range(0, n, s)]
    B = torch.zeros(len(buckets), n, dtype=torch.float64)
    for b, rows in enumerate(buckets):
        B[b, rows] = 1.0 / len(rows)
    return B


class Bucketing:
    """Wraps an aggregator: shuffle, average buckets of s rows, aggregate the bucket means."""

    stateful = True

    def __init__(self, inner: Any, s: int, seed: int):
        self.inner, self.s, self.seed = inner, s, seed

    def required_rows(self) -> int:
        return self.s * (self.inner.required_rows() - 1) + 1

    def __call__(self, G: torch.Tensor, state: dict | None = None, gram_matrix=None) -> Any:
        rnd = int(state.get("round", 0)) if state else 0
        B = bucket_matrix(G.shape[0], self.s, self.seed, rnd)
        K = None if gram_matrix is None else B @ gram_matrix @ B.T
        res = self.inner(B.to(G.dtype) @ G, state.get("inner") if state else None, K)
        if res.weights is not None:
            res.weights = B.T @ res.weights
        if res.selected is not None:
            res.selected = sorted({int(i) for b in res.selected for i in torch.nonzero(B[b]).flatten()})
        res.state = {"round": rnd + 1, "inner": res.state}
        return res


class Pipeline:
    def __init__(self, name: str, cfg: Any, f: int, nnm: bool = False, bucket_size: int = 1, seed: int = 0):
        self.name, self.cfg, self.f, self.nnm, self.s, self.seed = name, cfg, f, nnm, bucket_size, seed
        self._built: dict[int, Any] = {}
        self.stateful = registry()[name].stateful or bucket_size > 1

    def at(self, f: int) -> Any:
        if f not in self._built:
            agg = build(self.name, self.cfg, f)
            agg = NNM(agg, f) if self.nnm else agg
            self._built[f] = Bucketing(agg, self.s, self.seed) if self.s > 1 else agg
        return self._built[f]

    def required_rows(self, f: int) -> int:
        return self.at(f).required_rows()

    def __call__(self, G: torch.Tensor, state: dict | None = None) -> Any:
        return self.at(self.f)(G, state)

    def check(self, n: int, prefix: str = "strategy") -> None:
        """Every bound on n (and the rule's parameters) as a one-line ConfigError naming its key."""
        cls, f = registry()[self.name], self.f
        rows = -(-n // self.s)
        where = f"cluster.num_workers={n}" + (f" in ceil(n / {self.s}) = {rows} buckets" if self.s > 1 else "")
        need, text = cls.min_workers(self.cfg, f)
        key = f"{prefix}.bucketing.size" if self.s > 1 and n >= need else f"{prefix}.f"
        value = self.s if key.endswith("size") else f
        check(rows >= need, key, value, f"aggregator={self.name} needs {text}; {where} (needs >= {need})")
        if self.nnm:
            check(rows > 2 * f, f"{prefix}.nnm", self.nnm, f"needs n > 2f; {where}, f={f}")
        cls.check_params(self.cfg, rows, f, f"{prefix}.{self.name}")
