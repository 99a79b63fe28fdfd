"""Robust aggregators without Ray: hand-computed outputs, permutation invariance, bounds under
1e6 outliers, the Flag Aggregator's Gram-space IRLS against the paper's IRLS in the full space."""

from __future__ import annotations

import pytest
import torch

from raylane.strategies.blocks.aggregators import NNM, build, registry
from raylane.strategies.blocks.aggregators.clipping import CenteredClippingConfig
from raylane.strategies.blocks.aggregators.flag import FlagConfig
from raylane.strategies.blocks.aggregators.krum import MultiKrumConfig

pytestmark = pytest.mark.timeout(120)


def agg(name: str, f: int, **cfg):
    return build(name, registry()[name].config_cls(**cfg), f)


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- hand-computed ------------------------------------------------------------------------
def test_mean_median_trimmed_mean_on_hand_computed_inputs():
    assert torch.equal(agg("mean", 0)(T([[1, 2], [3, 4], [5, 6]])).vector, T([3, 4]))
    assert torch.equal(agg("median", 1)(T([[1, 10], [2, 20], [100, -5]])).vector, T([2, 10]))
    assert torch.equal(agg("median", 1)(T([[1], [2], [3], [10]])).vector, T([2.5]))  # even n: middle two
    assert torch.equal(agg("trimmed_mean", 1)(T([[1], [2], [3], [100]])).vector, T([2.5]))
    assert torch.equal(agg("trimmed_mean", 0, trim=2)(T([[1], [2], [3], [4], [100]])).vector, T([3]))


def test_krum_and_multi_krum_pick_the_rows_with_the_lowest_scores():
    G = T([[0], [1], [2.5], [3], [100]])     # f=1: scores sum the 2 nearest squared distances
    res = agg("krum", 1)(G)                  # 0: 1+6.25  1: 1+2.25  2.5: 0.25+2.25  3: 0.25+4
    assert res.selected == [2] and torch.equal(res.vector, T([2.5]))
    res = agg("multi_krum", 1)(G)            # m = n - f = 4: all but 100
    assert res.selected == [0, 1, 2, 3] and torch.allclose(res.vector, T([1.625]))
    res = build("multi_krum", MultiKrumConfig(m=2), 1)(G)
    assert res.selected == [1, 2] and torch.allclose(res.vector, T([1.75]))


def test_bulyan_selects_by_krum_then_averages_the_beta_closest_to_the_median():
    # n = 7 = 4f + 3, f = 1: theta = 5 rows by Krum (the cluster), beta = 3 closest to its median 2
    G = T([[0, 0], [1, 10], [2, 20], [3, 30], [4, 40], [50, -500], [-60, 600]])
    res = agg("bulyan", 1)(G)
    assert res.selected == [0, 1, 2, 3, 4]
    assert torch.allclose(res.vector, T([2, 20]))


def test_geometric_median_of_collinear_points_is_their_median():
    res = agg("geomed", 0)(T([[0, 0], [1, 0], [10, 0]]))
    assert torch.allclose(res.vector, T([1, 0]), atol=1e-4)
    assert torch.allclose(res.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_centered_clipping_clips_around_the_previous_aggregate_and_returns_it_as_state():
    cc = build("centered_clipping", CenteredClippingConfig(tau=1.0, iters=1), 0)
    res = cc(T([[3, 4], [0, 0.5]]))          # center 0: (3,4) clipped to (0.6,0.8); (0,0.5) kept
    assert torch.allclose(res.vector, T([0.3, 0.65]))
    assert torch.equal(res.state["center"], res.vector)
    again = cc(T([[0.3, 0.65], [0.3, 0.65]]), state=res.state)   # rows at the center: no move
    assert torch.allclose(again.vector, T([0.3, 0.65]))


def test_nnm_replaces_each_row_by_the_mean_of_its_n_minus_f_nearest():
    res = NNM(agg("mean", 1), 1)(T([[0], [1], [10]]))     # mixed rows: 0.5, 0.5, 5.5
    assert torch.allclose(res.vector, T([6.5 / 3]))
    assert torch.allclose(res.weights, torch.tensor([1 / 3, 0.5, 1 / 6], dtype=torch.float64))


def test_flag_hand_computed_subspaces():
    e = torch.eye(3)
    X = torch.stack([e[0], 2 * e[0], 5 * e[0], e[1], e[2]])   # Y = e1; Y Yᵀ sum of unit rows = 3 e1
    ref = build("flag", FlagConfig(r=1, rescale="none"), 0)(X)
    assert torch.allclose(ref.vector, T([3, 0, 0]), atol=1e-6)
    med = build("flag", FlagConfig(r=1), 0)(X)                 # median norm 1, Y Yᵀ mean = 0.6 e1
    assert torch.allclose(med.vector, T([0.6, 0, 0]), atol=1e-6)
    two = build("flag", FlagConfig(r=2, rescale="none"), 0)(torch.stack([e[0], e[0], 3 * e[1]]))
    assert torch.allclose(two.vector, T([1, 0.5, 0]), atol=1e-6)   # span{e1, e2}: (2 e1 + e2) / 2


def test_flag_with_r1_on_copies_of_a_vector_returns_its_direction():
    v = torch.randn(50, generator=torch.Generator().manual_seed(1))
    G = v.repeat(6, 1)
    ref = build("flag", FlagConfig(r=1, rescale="none"), 0)(G).vector
    assert torch.allclose(ref, 6 * v / v.norm(), atol=1e-5)
    assert torch.allclose(build("flag", FlagConfig(r=1), 0)(G).vector, v, atol=1e-5)


def _direct_flag(G: torch.Tensor, cfg: FlagConfig) -> torch.Tensor:
    """The paper's FlagIRLS in the full d-dimensional space (SVD of the weighted column matrix)."""
    X = (G.double() / G.double().norm(dim=1, keepdim=True)).T          # d x n, unit columns
    n = X.shape[1]

    def columns(Y):
        def w(v):
            s = (1 - ((Y.T @ v) ** 2).sum()).abs() if Y is not None else torch.tensor(1.0, dtype=torch.float64)
            return (s + cfg.eps) ** -0.25
        cols = [w(X[:, i]) * X[:, i] for i in range(n)]
        if cfg.lam > 0:
            cols += [w(X[:, i] - X[:, j]) * cfg.lam / (n * (n - 1)) * (X[:, i] - X[:, j])
                     for i in range(n) for j in range(n) if i != j]
        return torch.stack(cols, dim=1)

    def err(Y):
        return float((1 - ((Y.T @ X) ** 2).sum(dim=0)).clamp(min=0).sqrt().sum())

    Y, Y0, e_prev, diff = None, None, float(n), 1.0
    for _ in range(cfg.max_iters):
        if not (diff > 1e-10 and e_prev > 1e-10):
            break
        Y0, Y = Y, torch.linalg.svd(columns(Y), full_matrices=False)[0][:, :cfg.r]
        e = err(Y)
        diff, e_prev = e_prev - e, e
    Y = Y if diff > 0 or Y0 is None else Y0
    out = Y @ (Y.T @ X.sum(dim=1))
    if cfg.rescale == "none":
        return out / cfg.r
    return out / n * G.double().norm(dim=1).median()


@pytest.mark.parametrize("r,lam", [(1, 0.0), (2, 0.0), (3, 5.0)])
def test_flag_gram_space_irls_equals_the_papers_irls_in_the_full_space(r, lam):
    g = torch.Generator().manual_seed(r)
    base = torch.randn(3, 40, generator=g)
    G = (torch.randn(9, 3, generator=g) @ base + 0.3 * torch.randn(9, 40, generator=g)).float()
    G[7:] = 20 * torch.randn(2, 40, generator=g)
    for rescale in ("none", "median_norm"):
        cfg = FlagConfig(r=r, lam=lam, rescale=rescale)
        ours = build("flag", cfg, 2)(G).vector.double()
        assert torch.allclose(ours, _direct_flag(G, cfg), atol=1e-5 * float(ours.norm()) + 1e-6)


# -- invariances and bounds ----------------------------------------------------------------
ALL = sorted(set(registry()) - {"monna"})   # MoNNA depends on its pivot row by definition (test_robust_rules)


@pytest.mark.parametrize("name", ALL)
def test_aggregators_are_permutation_invariant(name):
    g = torch.Generator().manual_seed(3)
    G = torch.randn(11, 30, generator=g)
    perm = torch.randperm(11, generator=g)
    a, b = agg(name, 2)(G), agg(name, 2)(G[perm])
    assert torch.allclose(a.vector, b.vector, atol=1e-5)
    if a.weights is not None:
        assert torch.allclose(a.weights[perm], b.weights, atol=1e-9)


def _attacked(seed: int = 0, n: int = 15, f: int = 3, d: int = 64):
    g = torch.Generator().manual_seed(seed)
    honest = torch.ones(d) + 0.1 * torch.randn(n - f, d, generator=g)
    bad = 1e6 * torch.randn(f, d, generator=g)
    G = torch.cat([bad, honest])
    return G, honest, f


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "bulyan"])
def test_coordinatewise_rules_stay_within_the_honest_range_under_1e6_outliers(name):
    G, H, f = _attacked()
    v = agg(name, f)(G).vector
    assert bool((v >= H.min(dim=0).values - 1e-6).all() and (v <= H.max(dim=0).values + 1e-6).all())


def test_krum_family_selects_only_honest_rows_under_1e6_outliers():
    G, H, f = _attacked()
    assert agg("krum", f)(G).selected[0] >= f
    assert all(i >= f for i in agg("multi_krum", f)(G).selected)
    assert all(i >= f for i in agg("bulyan", f)(G).selected)


def test_geometric_median_within_its_breakdown_bound_under_1e6_outliers():
    G, H, f = _attacked()
    n, mu = G.shape[0], H.mean(dim=0)
    radius = float((H - mu).norm(dim=1).max())
    v = agg("geomed", f)(G).vector
    assert float((v - mu).norm()) <= 2 * (n - f) / (n - 2 * f) * radius * 1.01


def test_flag_under_1e6_outliers_points_along_the_honest_mean_with_a_median_norm():
    G, H, f = _attacked()
    mu = H.mean(dim=0)
    for cfg in (FlagConfig(r=1), FlagConfig(r=2, lam=1.0)):
        v = build("flag", cfg, f)(G).vector
        assert float(torch.nn.functional.cosine_similarity(v, mu, dim=0)) > 0.99
        assert float(v.norm()) <= float(H.norm(dim=1).max())


def test_centered_clipping_moves_at_most_tau_from_its_center_under_1e6_outliers():
    G, H, f = _attacked()
    center = H.mean(dim=0)
    cc = build("centered_clipping", CenteredClippingConfig(tau=0.5, iters=2), f)
    v = cc(G, state={"center": center}).vector
    assert float((v - center).norm()) <= 2 * 0.5 + 1e-4


def test_nnm_before_the_median_keeps_it_in_the_honest_range_under_1e6_outliers():
    G, H, f = _attacked()
    v = NNM(agg("median", f), f)(G).vector
    assert bool((v >= H.min(dim=0).values - 1e-5).all() and (v <= H.max(dim=0).values + 1e-5).all())


def test_min_workers_conditions():
    assert registry()["krum"].min_workers(None, 2) == (7, "n > 2f + 2")
    assert registry()["bulyan"].min_workers(None, 2)[0] == 11
    assert registry()["median"].min_workers(None, 2)[0] == 5
    assert registry()["flag"].min_workers(FlagConfig(r=6), 1)[0] == 3    # r <= n: check_params, key flag.r
