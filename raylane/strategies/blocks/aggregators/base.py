"""The aggregator contract, shared helpers and the registry.

An aggregator turns the (n, d) matrix of the step's gradients (row i: worker i) into one
vector. It is a pure function of that matrix, of its own config and of an explicit `state`
(only centered clipping has one): no global RNG, no I/O, the same bits for the same input
on every process (same torch thread count), so every rank of a run may aggregate on its own.

    agg = build("krum", KrumConfig(), f=3)
    res = agg(G)                     # Result(vector, weights, selected, state, info)
    res = agg(G, state=res.state)    # stateful rules: pass the previous state back

Rules that return a linear combination of the rows (mean, Krum, Multi-Krum, geometric
median, centered clipping up to its state, Flag) report `weights` (vector == weights @ G)
and compute in the n x n Gram space: one float64 pass over G for the Gram matrix, the
rule's iterations on n x n numbers, one pass to combine. `gram` may be passed in when the
caller already has it (NNM does). Coordinate-wise rules (median, trimmed mean, Bulyan) work
on G itself. `min_workers(f)` is the smallest n a rule is defined for; `check_params(cfg, n, f,
prefix)` raises a one-line ConfigError for a parameter out of its bound at n (Multi-Krum's m,
Flag's r), naming the key; `required_rows()` is the smallest n the built rule (f fixed) accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

GRAM_CHUNK = 1 << 18  # columns converted to float64 at a time


@dataclass
class Result:
    vector: torch.Tensor                      # (d,), G's dtype
    weights: torch.Tensor | None = None       # (n,) float64: vector == weights @ G (linear rules)
    selected: list[int] | None = None         # rows a selection rule kept (Krum, Multi-Krum, Bulyan)
    state: dict[str, Any] | None = None       # the next call's state (stateful rules)
    info: dict[str, float] = field(default_factory=dict)


def gram(G: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """[G; extra] [G; extra]ᵀ in float64, converting GRAM_CHUNK columns at a time (d = 10M stays
    within one small float64 buffer)."""
    m, d = G.shape
    n = m + (0 if extra is None else extra.shape[0])
    K = torch.zeros(n, n, dtype=torch.float64)
    buf = torch.empty(n, min(d, GRAM_CHUNK), dtype=torch.float64)
    for s in range(0, d, GRAM_CHUNK):
        e = min(d, s + GRAM_CHUNK)
        b = buf[:, :e - s]
        b[:m].copy_(G[:, s:e])
        if extra is not None:
            b[m:].copy_(extra[:, s:e])
        K.addmm_(b, b.T)
    return K


def sq_distances(K: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances from a Gram matrix (clamped at 0)."""
    diag = K.diagonal()
    return (diag[:, None] + diag[None, :] - 2 * K).clamp_(min=0)


def mean_rows(G: torch.Tensor) -> torch.Tensor:
    """The mean of G's rows, summed one row at a time in row order and divided by n: for fp32 rows
    the very reduction `quantized_allreduce(op="avg")` makes of the same rows (comm.fast_paths.sum_fp32),
    so a rule that reduces to the mean gives an all-reduce's bits."""
    acc = G[0].clone()
    for row in G[1:]:
        acc.add_(row)
    return acc.div_(G.shape[0])


def combine(weights: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """weights @ G in G's dtype (one pass over G)."""
    return weights.to(G.dtype) @ G


def coordinate_median(G: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; the mean of the two middle values when n is even."""
    n = G.shape[0]
    if n % 2:
        return G.median(dim=0).values            # a selection, not a full sort (d = 10M)
    return (G.kthvalue(n // 2, dim=0).values + G.kthvalue(n // 2 + 1, dim=0).values) / 2


class Aggregator:
    """Subclasses set `name`, `config_cls` and implement `__call__` and `min_workers`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = type(None)
    stateful: ClassVar[bool] = False

    def __init__(self, cfg: Any, f: int):
        self.cfg, self.f = cfg, f

    @classmethod
    def min_workers(cls, cfg: Any, f: int) -> tuple[int, str]:
        """(smallest n, the condition in words) for which the rule with `cfg` tolerates f Byzantine rows."""
        return 2 * f + 1, "n > 2f"

    @classmethod
    def check_params(cls, cfg: Any, n: int, f: int, prefix: str) -> None:
        """Raise a ConfigError naming `prefix.<key>` when a parameter does not fit n rows (default: none)."""

    def required_rows(self) -> int:
        """The smallest number of rows this rule (its f and config) aggregates."""
        return max(1, self.min_workers(self.cfg, self.f)[0])

    def __call__(self, G: torch.Tensor, state: dict[str, Any] | None = None,
                 gram_matrix: torch.Tensor | None = None) -> Result:
        raise NotImplementedError(type(self).__name__)


_REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    if cls.name in _REGISTRY:
        raise KeyError(f"aggregator {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Aggregator]]:
    return dict(_REGISTRY)


def build(name: str, cfg: Any, f: int) -> Aggregator:
    return _REGISTRY[name](cfg, f)

