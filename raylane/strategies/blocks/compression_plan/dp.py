"""L-GreCo's level choice (Markov et al., MLSys 2024): a multiple-choice knapsack by dynamic programming.

Each layer l has candidate levels c with a compression error e[l, c] and payload bytes b[l, c]
(nan error / inf bytes: the level does not apply to the layer). Pick one level per layer to
minimise the total bytes subject to total error <= budget, budget = alpha * total error of the
per-layer default levels. Errors are discretised: one unit = delta * budget, each error rounded
*up* to whole units, capacity floor(1/delta) units, so a choice feasible in units is feasible in
reals. With alpha >= 1 the default choice is kept when the DP finds nothing smaller (rounding up
can push the default itself over capacity), so the result never sends more bytes than the default
and never errs more than alpha times the default; with alpha < 1, when nothing fits, each layer
takes its least-error level. Pure numpy; the same table gives the same
choice on every machine (ties: fewest bytes, then least error, then the lower level index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def solve_mckp(sizes: np.ndarray, costs: np.ndarray, capacity: int) -> tuple[list[int], float] | None:
    """Exact: one column per row with sum(costs) <= capacity and the least sum(sizes).

    sizes: float [L, C] (inf: unavailable); costs: int [L, C] >= 0 (> capacity: unavailable).
    Returns (column per row, total size), or None when nothing fits.
    """
    sizes, costs = np.asarray(sizes, dtype=np.float64), np.asarray(costs, dtype=np.int64)
    assert sizes.shape == costs.shape and sizes.ndim == 2 and capacity >= 0
    best = np.full(capacity + 1, np.inf)  # best[u]: least bytes so far with exactly u units of error
    best[0] = 0.0
    picks = np.full((sizes.shape[0], capacity + 1), -1, dtype=np.int64)
    for layer in range(sizes.shape[0]):
        nxt = np.full(capacity + 1, np.inf)
        for col in range(sizes.shape[1]):
            cost, size = int(costs[layer, col]), float(sizes[layer, col])
            if cost > capacity or not math.isfinite(size):
                continue
            cand = best[:capacity + 1 - cost] + size
            better = cand < nxt[cost:]
            nxt[cost:][better] = cand[better]
            picks[layer, cost:][better] = col
        best = nxt
    if not np.isfinite(best).any():
        return None
    units = int(np.argmin(best))  # first minimum: the least error among the cheapest
    total, choice = float(best[units]), []
    for layer in range(sizes.shape[0] - 1, -1, -1):
        col = int(picks[layer, units])
        choice.append(col)
        units -= int(costs[layer, col])
    return choice[::-1], total


@dataclass(frozen=True)
class Choice:
    """The levels picked (column per layer) and what they cost, beside the default's."""

    levels: list[int]
    bytes: float
    error: float
    default_bytes: float
    default_error: float
    budget: float


def choose_levels(errors: np.ndarray, sizes: np.ndarray, default: list[int], alpha: float,
                  delta: float) -> Choice:
    """Least total bytes with total error <= alpha * (error of `default`), errors discretised by delta.

    `default[l]` must be available for layer l. Layers whose every error is nan are not in the
    table's hands: give them a single available level.
    """
    errors, sizes = np.asarray(errors, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    rows = np.arange(errors.shape[0])
    available = np.isfinite(errors) & np.isfinite(sizes) & (errors >= 0)
    assert available[rows, default].all(), "every layer's default level must be available"
    d_err, d_bytes = float(errors[rows, default].sum()), float(sizes[rows, default].sum())
    budget = alpha * d_err
    levels = list(default)
    if budget > 0:
        capacity = int(math.floor(1.0 / delta))
        unit = budget / capacity
        with np.errstate(invalid="ignore"):
            costs = np.where(available, np.ceil(np.where(available, errors, 0.0) / unit), capacity + 1)
        costs = np.minimum(costs, capacity + 1).astype(np.int64)
        found = solve_mckp(np.where(available, sizes, np.inf), costs, capacity)
        if found is not None and (found[1] < d_bytes or alpha < 1):
            levels = found[0]
        elif found is None and alpha < 1:  # nothing fits: the least error there is
            levels = [int(np.nanargmin(np.where(available[l], errors[l], np.nan))) for l in rows]
    else:  # nothing may err: per layer, the fewest bytes among the exact levels
        for l in rows:
            exact = [c for c in range(errors.shape[1]) if available[l, c] and errors[l, c] <= 0]
            levels[l] = min(exact, key=lambda c: (sizes[l, c], c)) if exact else default[l]
    return Choice(levels, float(sizes[rows, levels].sum()), float(errors[rows, levels].sum()),
                  d_bytes, d_err, budget)
