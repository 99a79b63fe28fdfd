"""One robust aggregation of the step's (n, d) gradient matrix, and what it measures.

`aggregate(pipeline, G, state, byzantine, measure)`:
- drops every row holding an inf or nan before the rule sees it (zeroing it instead would hand the
  attacker a free zero row: Multi-Krum and NNM average it in, Krum may pick it). A dropped row is a
  suspected Byzantine row: it is counted (`robust/dropped_rows`) and lowers the f the rule runs
  with (f' = max(0, f - dropped): the rows left hold at most f - dropped Byzantine ones, provided
  honest rows are finite). If fewer rows remain than the rule needs at f', the round fails with
  `NotEnoughRows` (a one-line message naming the counts);
- runs the pipeline (aggregators/pipeline.py) on the rows left, and maps per-row results (weights,
  selections, per-rank info) back to the ranks;
- with `measure` returns the metrics: `robust/aggregate_s`, the Byzantine, dropped and f' counts,
  the distance and cosine of the aggregate to the honest mean (the mean of the finite rows of the
  ranks the fault plan did not make Byzantine), norms, and per rank the rule's weight
  (`robust/weight/rank<i>`: aggregate = sum_i weight_i g_i, for rules that combine rows; a dropped
  row's weight is 0), selection (`robust/selected/rank<i>`) or IRLS weight (`robust/flag_weight/rank<i>`).
Shared by the worker and the driver half of `robust`, the adaptive attacks and the benchmark.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from raylane.strategies.blocks.aggregators import Result

_RANK_KEY = re.compile(r"^(.*/rank)(\d+)$")


class NotEnoughRows(RuntimeError):
    """Too few finite rows for the rule this round."""


def finite_rows(G: torch.Tensor) -> list[int]:
    """Indices of the rows without inf or nan."""
    return torch.isfinite(G).all(dim=1).nonzero().flatten().tolist()


def _to_ranks(res: Result, keep: list[int], n: int) -> Result:
    """Per-row results of the kept rows, re-indexed by rank."""
    if len(keep) == n:
        return res
    if res.weights is not None:
        w = torch.zeros(n, dtype=res.weights.dtype)
        w[keep] = res.weights
        res.weights = w
    if res.selected is not None:
        res.selected = [keep[i] for i in res.selected]
    info = {}
    for k, x in res.info.items():
        m = _RANK_KEY.match(k)
        info[f"{m.group(1)}{keep[int(m.group(2))]}" if m else k] = x
    res.info = info
    return res


def run_rule(pipeline: Any, G: torch.Tensor, state: dict | None) -> tuple[Result, int, int]:
    """(result indexed by rank, dropped rows, the f the rule ran with)."""
    n = G.shape[0]
    keep = finite_rows(G)
    dropped = n - len(keep)
    f = max(0, pipeline.f - dropped)
    need = pipeline.required_rows(f)
    if len(keep) < need:
        raise NotEnoughRows(f"robust: {dropped} of {n} rows hold inf/nan and were dropped; the {len(keep)} left are "
                            f"fewer than aggregator={pipeline.name} needs at f={f} ({need})")
    res = pipeline.at(f)(G if dropped == 0 else G[keep], state)
    return _to_ranks(res, keep, n), dropped, f


def aggregate(pipeline: Any, G: torch.Tensor, state: dict | None, byzantine: tuple[int, ...] | list[int],
              measure: bool, prefix: str = "robust") -> tuple[Result, dict[str, float]]:
    """The rule's result on G's finite rows; with `measure`, its metrics under `prefix`/."""
    t0 = time.perf_counter()
    res, dropped, f = run_rule(pipeline, G, state)
    elapsed = time.perf_counter() - t0
    if not measure:
        return res, {}
    n = G.shape[0]
    finite = set(finite_rows(G))
    honest = [i for i in range(n) if i not in set(byzantine) and i in finite] or sorted(finite)
    mu = G[honest].double().mean(dim=0)
    v = res.vector.double()
    mu_norm, v_norm = float(mu.norm()), float(v.norm())
    cos = float(v @ mu) / (mu_norm * v_norm) if mu_norm > 0 and v_norm > 0 else 0.0
    p = prefix
    m = {f"{p}/aggregate_s": elapsed, f"{p}/byzantine_rows": float(len(byzantine)),
         f"{p}/dropped_rows": float(dropped), f"{p}/f_used": float(f),
         f"{p}/dist_to_honest_mean": float((v - mu).norm()),
         f"{p}/cos_to_honest_mean": cos, f"{p}/honest_mean_norm": mu_norm, f"{p}/aggregate_norm": v_norm}
    if res.weights is not None:
        m.update({f"{p}/weight/rank{i}": float(w) for i, w in enumerate(res.weights)})
    if res.selected is not None:
        chosen = set(res.selected)
        m.update({f"{p}/selected/rank{i}": float(i in chosen) for i in range(n)})
    m.update({f"{p}/{k}": float(x) for k, x in res.info.items()})
    return res, m
