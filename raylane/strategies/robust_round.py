"""One robust aggregation of the step's (n, d) gradient matrix, and what it measures.

`aggregate(agg, G, state, byzantine, measure)` cleans the matrix (a row with inf or nan
cannot be aggregated by any rule: it becomes a zero row, counted), runs the aggregator, and
with `measure` returns the metrics: `robust/aggregate_s`, the Byzantine and non-finite row
counts, the distance and cosine of the aggregate to the honest mean (the mean of the rows of
the ranks the fault plan did not make Byzantine), norms, and per rank the rule's weight
(`robust/weight/rank<i>`: aggregate = sum_i weight_i g_i, for rules that combine rows),
selection (`robust/selected/rank<i>`: Krum, Multi-Krum, Bulyan) or IRLS weight
(`robust/flag_weight/rank<i>`). Shared by the worker and the driver half of `robust`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from raylane.strategies.aggregators import Result


def clean(G: torch.Tensor) -> tuple[torch.Tensor, int]:
    """G with every row that holds inf or nan replaced by zeros; the number of such rows."""
    bad = ~torch.isfinite(G).all(dim=1)
    count = int(bad.sum())
    if count:
        G = G.clone()
        G[bad] = 0
    return G, count


def aggregate(agg: Any, G: torch.Tensor, state: dict | None, byzantine: tuple[int, ...] | list[int],
              measure: bool) -> tuple[Result, dict[str, float]]:
    t0 = time.perf_counter()
    G, nonfinite = clean(G)
    res = agg(G, state)
    elapsed = time.perf_counter() - t0
    if not measure:
        return res, {}
    n = G.shape[0]
    honest = [i for i in range(n) if i not in set(byzantine)] or list(range(n))
    mu = G[honest].double().mean(dim=0)
    v = res.vector.double()
    mu_norm, v_norm = float(mu.norm()), float(v.norm())
    cos = float(v @ mu) / (mu_norm * v_norm) if mu_norm > 0 and v_norm > 0 else 0.0
    m = {"robust/aggregate_s": elapsed, "robust/byzantine_rows": float(len(byzantine)),
         "robust/nonfinite_rows": float(nonfinite), "robust/dist_to_honest_mean": float((v - mu).norm()),
         "robust/cos_to_honest_mean": cos, "robust/honest_mean_norm": mu_norm, "robust/aggregate_norm": v_norm}
    if res.weights is not None:
        m.update({f"robust/weight/rank{i}": float(w) for i, w in enumerate(res.weights)})
    if res.selected is not None:
        chosen = set(res.selected)
        m.update({f"robust/selected/rank{i}": float(i in chosen) for i in range(n)})
    m.update({f"robust/{k}": float(x) for k, x in res.info.items()})
    return res, m
