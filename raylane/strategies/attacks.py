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
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from raylane.strategies.aggregators.base import gram


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
