"""Colluding, omniscient Byzantine attacks: what the Byzantine workers send, from the honest gradients.

Pure functions of the (h, d) matrix of the step's honest gradients (the robustness literature's
omniscient adversary: it knows every honest gradient of the step and all its workers send the
same vector):
- `alie` (Baruch et al. 2019, "A Little Is Enough"): mu - z sigma coordinate-wise (mu, sigma: the
  honest mean and sample standard deviation), z from n and f as the paper defines it:
  s = floor(n/2 + 1) - f supporters needed, z = Phi^{-1}((n - s) / n).
- `ipm` (Xie et al. 2020, inner-product manipulation): -epsilon mu.
- `mimic` (Karimireddy et al. 2022): a copy of one honest worker's gradient; `target` >= 0 picks
  the honest row, -1 the paper's choice: the honest row farthest along the top principal
  direction of the centered honest gradients (computed on the step's gradients, not averaged
  over a warm-up phase as in the paper).
- `flip_labels` (label flipping): a classification label y of C classes becomes C - 1 - y; the
  worker then computes its ordinary gradient on its own, flipped data.
- `adaptive` (the "optimal" ALIE and IPM of the robustness benchmarks, e.g. Allouah et al. 2023
  and the ByzFL library): the attack's factor (ALIE's z, IPM's epsilon) is searched each round
  against the aggregator actually in use, to maximise |aggregate - honest mean|: the aggregate of
  the matrix whose honest rows are the step's honest gradients and whose Byzantine rows all send
  the forged vector. The search: the objective on a log grid of SEARCH_GRID factors in
  [SEARCH_LO, SEARCH_HI], then SEARCH_REFINE golden-section steps (in log factor) around the best
  grid point; ties keep the smaller factor. Deterministic: every Byzantine rank finds the same row.
  Cost: SEARCH_GRID + SEARCH_REFINE + 1 aggregations per round on the Byzantine ranks.
The Gaussian (the sent row plus N(0, scale²) noise) and infinity (+inf rows) attacks corrupt the
wire (workers/chaos.py `corruption`); the robust strategy drops inf/nan rows before aggregating.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable

import torch

from raylane.strategies.blocks.aggregators.base import gram


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max for n workers of which f are Byzantine."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"alie: no z for n={n}, f={f} (needs 0 < (n - s)/n < 1, s = floor(n/2 + 1) - f)")
    return NormalDist().inv_cdf(p)


def alie(honest: torch.Tensor, z: float) -> torch.Tensor:
    """mu - z * sigma over the honest rows (sigma: sample std; 0 for a single row)."""
    mu = honest.mean(dim=0)
    if honest.shape[0] < 2:
        return mu
    return mu - z * honest.std(dim=0)


def ipm(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """-epsilon times the honest mean."""
    return -epsilon * honest.mean(dim=0)


def mimic_target(honest: torch.Tensor) -> int:
    """The honest row with the largest |<g_i - mu, z>|, z the top principal direction (ties: lowest index)."""
    h = honest.shape[0]
    if h < 2:
        return 0
    K = gram(honest)
    C = torch.eye(h, dtype=torch.float64) - 1.0 / h          # centering
    Kc = C @ K @ C                                           # Gram of the centered rows
    evals, evecs = torch.linalg.eigh(Kc)
    # the centered rows' projections on the top principal direction are proportional to Kc v
    proj = (Kc @ evecs[:, -1]).abs()
    best = float(proj.max())
    return min(i for i in range(h) if float(proj[i]) >= best * (1 - 1e-12))


def mimic(honest: torch.Tensor, target: int = -1) -> torch.Tensor:
    i = mimic_target(honest) if target < 0 else target
    return honest[i].clone()


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return num_classes - 1 - y


SEARCH_LO, SEARCH_HI, SEARCH_GRID, SEARCH_REFINE = 0.03, 100.0, 12, 6
PHI = (math.sqrt(5) - 1) / 2


def with_byzantine_rows(honest: torch.Tensor, ranks: list[int] | tuple[int, ...], n: int,
                        row: torch.Tensor) -> torch.Tensor:
    """The (n, d) matrix a round sees: honest rows in rank order, `row` at every Byzantine rank."""
    G = torch.empty(n, honest.shape[1], dtype=honest.dtype)
    bad = set(ranks)
    G[[i for i in range(n) if i not in bad]] = honest
    G[sorted(bad)] = row.to(honest.dtype)
    return G


def adaptive(honest: torch.Tensor, ranks: list[int] | tuple[int, ...], n: int,
             forge: Callable[[torch.Tensor, float], torch.Tensor],
             target: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(the forged row, its factor) maximising |target(G) - honest mean| over the factor of `forge`
    (forge(honest, factor) -> row), searched as the module docstring says."""
    mu = honest.double().mean(dim=0)
    cache: dict[float, float] = {}

    def damage(x: float) -> float:
        if x not in cache:
            try:
                v = target(with_byzantine_rows(honest, ranks, n, forge(honest, x)))
            except (RuntimeError, ValueError):        # the rule cannot aggregate this matrix
                cache[x] = -1.0
                return cache[x]
            d = float((v.double() - mu).norm())
            cache[x] = d if math.isfinite(d) else -1.0     # a rule that fails is not a win
        return cache[x]

    lo, hi = math.log(SEARCH_LO), math.log(SEARCH_HI)
    grid = [lo + (hi - lo) * k / (SEARCH_GRID - 1) for k in range(SEARCH_GRID)]
    scores = [damage(math.exp(t)) for t in grid]
    k = max(range(SEARCH_GRID), key=lambda i: (scores[i], -i))
    a, b = grid[max(0, k - 1)], grid[min(SEARCH_GRID - 1, k + 1)]
    best_t, best = grid[k], scores[k]
    for _ in range(SEARCH_REFINE):                       # golden section on [a, b] in log factor
        c, d = b - PHI * (b - a), a + PHI * (b - a)
        fc, fd = damage(math.exp(c)), damage(math.exp(d))
        for t, val in ((c, fc), (d, fd)):
            if val > best:
                best_t, best = t, val
        a, b = (a, d) if fc >= fd else (c, b)
    factor = math.exp(best_t)
    return forge(honest, factor), factor


def alie_opt(honest, ranks, n, target) -> tuple[torch.Tensor, float]:
    """ALIE with z searched against `target` (adaptive)."""
    return adaptive(honest, ranks, n, alie, target)


def ipm_opt(honest, ranks, n, target) -> tuple[torch.Tensor, float]:
    """IPM with epsilon searched against `target` (adaptive)."""
    return adaptive(honest, ranks, n, ipm, target)
