"""The rules added after the ByzFL comparison (MDA, SMEA, MoNNA, Meamed, CAF), each against a direct
full-space reimplementation of its paper's formula on small fixed inputs (1e-6), and each one's
breakdown property on a constructed attack; the geometric median's robust start; bucketing."""

from __future__ import annotations

import itertools

import pytest
import torch

from raylane.strategies.blocks.aggregators import build, registry
from raylane.strategies.blocks.aggregators.geomed import GeoMedConfig
from raylane.strategies.blocks.aggregators.monna import MonnaConfig
from raylane.strategies.blocks.aggregators.pipeline import Pipeline, bucket_matrix

pytestmark = pytest.mark.timeout(60)


def agg(name: str, f: int, **cfg):
    return build(name, registry()[name].config_cls(**cfg), f)


def fixed(n: int = 9, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- direct reimplementations (full space, float64, written from the papers' definitions) --------
def ref_mda(X, f):
    # ties on the diameter (one pair's distance): the smallest sum of squared pairwise distances
    best = min(itertools.combinations(range(len(X)), len(X) - f),
               key=lambda S: (max(float((X[i] - X[j]).norm()) for i in S for j in S),
                              sum(float((X[i] - X[j]).norm()) ** 2 for i in S for j in S)))
    return X[list(best)].mean(dim=0)


def ref_smea(X, f):
    def lam(S):
        Y = X[list(S)] - X[list(S)].mean(dim=0)
        return float(torch.linalg.eigvalsh(Y.T @ Y / len(S))[-1])
    best = min(itertools.combinations(range(len(X)), len(X) - f), key=lam)
    return X[list(best)].mean(dim=0)


def ref_monna(X, f, pivot):
    d = [float((X[j] - X[pivot]).norm()) for j in range(len(X))]
    nearest = sorted(range(len(X)), key=lambda j: (d[j], j))[: len(X) - f]
    return X[nearest].mean(dim=0)


def ref_meamed(X, f):
    out = torch.empty(X.shape[1], dtype=X.dtype)
    for k in range(X.shape[1]):
        col = X[:, k].tolist()
        s = sorted(col)
        med = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        close = sorted(range(len(col)), key=lambda i: (abs(col[i] - med), i))[: len(col) - f]
        out[k] = sum(col[i] for i in close) / len(close)
    return out


def ref_caf(X, f):
    n = len(X)
    c = torch.ones(n, dtype=X.dtype)
    best, best_mu = float("inf"), X.mean(dim=0)
    while float(c.sum()) > n - 2 * f:
        mu = (c[:, None] * X).sum(dim=0) / c.sum()
        Y = X - mu
        cov = (c[:, None] * Y).T @ Y / c.sum()
        evals, evecs = torch.linalg.eigh(cov)
        if float(evals[-1]) < best:
            best, best_mu = float(evals[-1]), mu
        tau = (Y @ evecs[:, -1]) ** 2
        c = c * (1 - tau / tau[c > 0].max())
    return best_mu


CASES = [("mda", ref_mda), ("smea", ref_smea), ("meamed", ref_meamed), ("caf", ref_caf)]


@pytest.mark.parametrize("name,ref", CASES)
@pytest.mark.parametrize("f", [1, 3])
def test_rule_equals_its_papers_formula_on_fixed_inputs(name, ref, f):
    for seed in range(3):
        X = fixed(seed=seed)
        X[:f] += 4.0 * fixed(f, 5, seed=10 + seed)          # a few rows off
        assert torch.allclose(agg(name, f)(X).vector, ref(X, f), atol=1e-6)


@pytest.mark.parametrize("pivot", [0, 4])
def test_monna_equals_its_papers_formula_on_fixed_inputs(pivot):
    for seed in range(3):
        X = fixed(seed=seed)
        v = build("monna", MonnaConfig(pivot=pivot), 3)(X).vector
        assert torch.allclose(v, ref_monna(X, 3, pivot), atol=1e-6)


def test_monna_follows_its_pivot_under_a_permutation_of_the_rows():
    X = fixed(11, 4, 9)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    a = build("monna", MonnaConfig(pivot=3), 2)(X).vector
    b = build("monna", MonnaConfig(pivot=int((perm == 3).nonzero())), 2)(X[perm]).vector
    assert torch.allclose(a, b, atol=1e-12)


# -- breakdown properties ---------------------------------------------------------------------
def _far(n=11, f=3, d=6, seed=1):
    honest = fixed(n - f, d, seed) * 0.1 + 1.0
    bad = 1e6 * fixed(f, d, seed + 50)
    return torch.cat([honest, bad]), honest


@pytest.mark.parametrize("name", ["mda", "smea", "monna", "meamed"])
def test_rule_ignores_f_far_rows_exactly(name):
    G, H = _far()
    res = agg(name, 3)(G)
    assert torch.allclose(res.vector, H.mean(dim=0), atol=1e-9)
    if res.weights is not None:
        assert float(res.weights[-3:].abs().sum()) == 0.0


def test_caf_stays_within_the_honest_spread_under_far_rows():
    G, H = _far()
    mu = H.mean(dim=0)
    spread = float(torch.linalg.eigvalsh((H - mu).T @ (H - mu) / len(H))[-1]) ** 0.5
    assert float((agg("caf", 3)(G).vector - mu).norm()) <= 3 * spread


def test_subset_rules_and_caf_on_an_alie_like_cluster_pick_honest_weight():
    # f rows placed together just outside the honest cloud: MDA's diameter and SMEA's eigenvalue
    # are smallest without them
    H = fixed(12, 4, 7) * 0.1
    bad = (H.mean(dim=0) + torch.tensor([3.0, 0, 0, 0], dtype=torch.float64)).expand(3, 4)
    G = torch.cat([H, bad])
    for name in ("mda", "smea"):
        assert agg(name, 3)(G).selected == list(range(12))


def test_min_workers_of_the_new_rules():
    for name in ("mda", "smea", "monna", "meamed", "caf"):
        assert registry()[name].min_workers(None, 5) == (11, "n > 2f")


# -- geometric median's robust start ------------------------------------------------------------
def test_geomed_robust_start_converges_where_the_mean_start_is_dragged_away():
    H = fixed(10, 8, 3) * 0.1 + 1.0
    G = torch.cat([H, 1e6 * torch.ones(4, 8, dtype=torch.float64)])
    mu = H.mean(dim=0)
    exact = build("geomed", GeoMedConfig(max_iters=1000, ftol=1e-14), 4)(G).vector
    mean_start = build("geomed", GeoMedConfig(max_iters=3, start="mean"), 4)(G).vector
    robust = build("geomed", GeoMedConfig(max_iters=3), 4)(G).vector
    assert float((mean_start - mu).norm()) > 1e3            # three iterations from the mean: still far
    assert float((robust - mu).norm()) < 1.0                # from the median: among the honest rows
    assert float((robust - exact).norm()) < 1e-2               # and already near the true geometric median
    res = build("geomed", GeoMedConfig(), 4)(G)              # the stopping rule ends it before the cap
    assert res.info["iters"] < 100


# -- bucketing ----------------------------------------------------------------------------------
def test_bucketing_averages_seeded_buckets_and_its_round_is_its_state():
    G = fixed(7, 3, 5)
    p = Pipeline("mean", registry()["mean"].config_cls(), 1, bucket_size=2, seed=4)
    res = p(G)
    B = bucket_matrix(7, 2, 4, 0)
    assert B.shape == (4, 7) and torch.allclose(B.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(res.vector, (B @ G).mean(dim=0))
    assert torch.allclose(res.weights @ G, res.vector)
    assert res.state["round"] == 1 and not torch.equal(bucket_matrix(7, 2, 4, 1), B)
    again = p(G, res.state)
    assert again.state["round"] == 2


def test_bucketing_composes_with_nnm_and_every_rule():
    G = fixed(15, 6, 2)
    for name in sorted(registry()):
        cls = registry()[name]
        p = Pipeline(name, cls.config_cls(), 1, nnm=True, bucket_size=2)
        assert torch.isfinite(p(G).vector).all(), name
