"""Colluding Byzantine attacks without Ray: each attack on a hand-made honest set, the fault plan's
ground truth, the worker-side forge, and the robust strategy's config errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from statistics import NormalDist

import pytest
import torch

from raylane import config
from raylane.orchestrator.faults import FaultEvent, FaultPlan, FaultsConfig
from raylane.strategies.blocks import attacks
from raylane.validation import ConfigError
from raylane.workers.chaos import ByzantineStep, Directive

pytestmark = pytest.mark.timeout(120)

HONEST = torch.tensor([[1.0, 2.0], [3.0, 6.0]])


def test_alie_z_follows_the_papers_definition():
    # n=15, f=3: s = floor(15/2 + 1) - 3 = 5 supporters; z = Phi^-1((15 - 5) / 15)
    assert attacks.alie_z(15, 3) == pytest.approx(NormalDist().inv_cdf(10 / 15))
    assert attacks.alie_z(15, 3) == pytest.approx(0.430727, abs=1e-6)
    # the paper's example, n=50 and 24 Byzantine: s = 26 - 24 = 2, z = Phi^-1(48/50) ~ 1.75
    assert attacks.alie_z(50, 24) == pytest.approx(NormalDist().inv_cdf(48 / 50))
    assert attacks.alie_z(50, 24) == pytest.approx(1.75, abs=0.01)


def test_alie_is_mean_minus_z_sample_std():
    out = attacks.alie(HONEST, z=1.0)          # mean (2, 4), sample std (sqrt 2, 2 sqrt 2)
    assert torch.allclose(out, torch.tensor([2 - 2 ** 0.5, 4 - 2 * 2 ** 0.5]))


def test_ipm_is_minus_epsilon_times_the_honest_mean():
    assert torch.allclose(attacks.ipm(HONEST, 0.5), torch.tensor([-1.0, -2.0]))


def test_mimic_copies_the_honest_row_farthest_along_the_top_principal_direction():
    honest = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-3.0, 0.0], [0.0, 0.1]])   # x deviations .5 1.5 -2.5 .5
    assert attacks.mimic_target(honest) == 2
    assert torch.equal(attacks.mimic(honest), honest[2])
    assert torch.equal(attacks.mimic(honest, target=1), honest[1])


def test_label_flip_maps_y_to_c_minus_1_minus_y():
    assert attacks.flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]


def test_forge_asks_the_oracle_for_the_honest_rows_and_attacks_them():
    calls = []

    def oracle(ranks, flip):
        calls.append((list(ranks), flip))
        return HONEST if not flip else torch.tensor([[7.0, 7.0]])

    own = torch.zeros(2)
    assert torch.allclose(ByzantineStep((0, 3), "ipm", epsilon=2.0, oracle=oracle).forge(own, 0, 4),
                          torch.tensor([-4.0, -8.0]))
    assert calls[-1] == ([1, 2], False)
    z = attacks.alie_z(4, 2)
    assert torch.allclose(ByzantineStep((0, 3), "alie", oracle=oracle).forge(own, 3, 4), attacks.alie(HONEST, z))
    assert torch.equal(ByzantineStep((1,), "label_flip", oracle=oracle).forge(own, 1, 4), torch.tensor([7.0, 7.0]))
    assert calls[-1] == ([1], True)
    assert ByzantineStep((1,), None, oracle=oracle).forge(own, 0, 4) is own    # an honest rank sends its own


def test_every_rank_learns_the_steps_byzantine_ranks_and_only_they_attack():
    cfg = FaultsConfig(events=[FaultEvent(kind="byzantine", rank=0, step=2, until=3, mode="alie"),
                               FaultEvent(kind="byzantine", rank=2, step=2, until=3, mode="alie", z=1.5)])
    plan = FaultPlan(cfg, seed=0)
    assert plan.directives(1, 4) == {}
    d = plan.directives(2, 4)
    assert set(d) == {0, 1, 2, 3} and all(x.colluders == (0, 2) for x in d.values())
    assert [d[r].byzantine for r in range(4)] == ["alie", None, "alie", None]
    assert d[2].z == 1.5 and d[0].z is None
    assert Directive(colluders=(1,))  # delivered to honest ranks too


CASES = [
    (["strategy.aggregator=krum", "strategy.f=1", "cluster.num_workers=4"], "strategy.f", "n > 2f + 2"),
    (["strategy.aggregator=bulyan", "strategy.f=1", "cluster.num_workers=6"], "strategy.f", "n >= 4f + 3"),
    (["strategy.aggregator=median", "strategy.f=2", "cluster.num_workers=4"], "strategy.f", "n > 2f"),
    (["strategy.flag.r=0"], "strategy.flag.r", ">= 1"),
    (["strategy.flag.r=9"], "strategy.flag.r", "<= cluster.num_workers=4"),
    (["strategy.aggregator=multi_krum", "strategy.multi_krum.m=9"], "strategy.multi_krum.m",
     "<= cluster.num_workers=4"),
    (["strategy.aggregator=monna", "strategy.monna.pivot=4"], "strategy.monna.pivot", "< cluster.num_workers=4"),
    (["strategy.aggregator=median", "strategy.f=1", "strategy.bucketing.size=3"], "strategy.bucketing.size",
     "2 buckets"),
    (["strategy.aggregator=mda", "strategy.f=12", "cluster.num_workers=30"], "strategy.f", "subsets"),
    (["strategy.geomed.start=zero"], "strategy.geomed.start", "choose one of"),
    (["strategy.aggregator=nope"], "strategy.aggregator", "choose one of"),
    (["strategy.flag.rescale=norm"], "strategy.flag.rescale", "median_norm"),
    # 3 ALIE colluders of 4 workers: the paper's z does not exist (else every step fails at run time)
    (["faults=byzantine_alie"], "faults.events[0].mode", "cluster.num_workers=4"),
]


@pytest.mark.parametrize("overrides,key,allowed", CASES)
def test_robust_config_errors_are_one_line_config_errors(overrides, key, allowed):
    with pytest.raises(ConfigError) as err:
        config.load(["strategy=robust", "model=mlp", "data=digits", *overrides])
    assert key in str(err.value) and allowed in str(err.value) and "\n" not in str(err.value)


def test_gradient_attacks_need_the_robust_strategy():
    with pytest.raises(ConfigError, match=r"faults.events\[0\].mode='alie'.*strategy=robust"):
        config.load(["strategy=ddp", "model=mlp", "data=digits", "faults=byzantine_alie"])
    cfg = config.load(["strategy=robust", "model=cnn", "data=digits", "faults=byzantine_alie",
                       "cluster.num_workers=7", "strategy.f=3"])
    assert cfg.faults.events[0].mode == "alie"


def test_bulyan_condition_exits_2_from_the_command_line_before_ray():
    env = {"RAY_ADDRESS": "127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "raylane.train", "strategy=robust", "strategy.aggregator=bulyan",
                           "strategy.f=2", "cluster.num_workers=10", "model=mlp", "data=digits"],
                          capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "n >= 4f + 3" in proc.stderr


# -- adaptive (optimal) ALIE / IPM, Gaussian and infinity --------------------------------------
def _honest(n=10, d=6, seed=0):
    return 1.0 + 0.5 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_adaptive_search_finds_at_least_the_damage_of_every_grid_factor():
    from raylane.strategies.blocks.aggregators.pipeline import Pipeline
    from raylane.strategies.blocks.aggregators.simple import TrimmedMeanConfig

    honest, ranks, n = _honest(), (0, 1, 2), 13
    target = Pipeline("trimmed_mean", TrimmedMeanConfig(), 3)
    mu = honest.mean(dim=0)
    for forge, opt in ((attacks.alie, attacks.alie_opt), (attacks.ipm, attacks.ipm_opt)):
        row, factor = opt(honest, ranks, n, lambda G: target(G).vector)
        G = attacks.with_byzantine_rows(honest, ranks, n, row)
        assert torch.equal(G[3:], honest) and all(torch.equal(G[r], row) for r in ranks)
        best = float((target(G).vector - mu).norm())
        for x in (0.1, 0.43, 1.0, 2.0, 10.0):
            fixed = target(attacks.with_byzantine_rows(honest, ranks, n, forge(honest, x))).vector
            assert best >= float((fixed - mu).norm()) - 1e-6
        assert attacks.SEARCH_LO <= factor <= attacks.SEARCH_HI


def test_adaptive_modes_forge_against_the_given_aggregator_and_need_one():
    honest = _honest(4, 3)
    step = ByzantineStep((0, 5), "ipm_opt", oracle=lambda ranks, flip: honest)
    mean = lambda G: G.mean(dim=0)      # against the mean, the largest epsilon hurts most
    out = step.forge(torch.zeros(3), 0, 6, mean)
    assert torch.allclose(out, attacks.ipm(honest, attacks.SEARCH_HI), rtol=1e-5)
    with pytest.raises(RuntimeError, match="aggregator"):
        step.forge(torch.zeros(3), 0, 6)


def test_infinity_and_gaussian_wire_attacks():
    from raylane.workers.chaos import corruption

    t = torch.ones(5)
    assert torch.isinf(corruption("inf", 10.0, 0)(t)).all()
    noisy = corruption("gaussian", 100.0, 0)(t)
    assert torch.isfinite(noisy).all() and float((noisy - t).abs().max()) > 10


@pytest.mark.parametrize("preset,mode", [("byzantine_alie_opt", "alie_opt"), ("byzantine_ipm_opt", "ipm_opt"),
                                         ("byzantine_gaussian", "gaussian"), ("byzantine_inf", "inf")])
def test_attack_presets_load(preset, mode):
    cfg = config.load(["strategy=robust", "model=mlp", "data=digits", f"faults={preset}",
                       "cluster.num_workers=7", "strategy.f=3", "strategy.aggregator=median"])
    assert [e.mode for e in cfg.faults.events] == [mode] * 3


# -- non-finite rows are dropped, never aggregated ---------------------------------------------
def _pipe(name, f, **kw):
    from raylane.strategies.blocks.aggregators import registry
    from raylane.strategies.blocks.aggregators.pipeline import Pipeline

    return Pipeline(name, registry()[name].config_cls(), f, **kw)


@pytest.mark.parametrize("name", ["mean", "krum", "multi_krum", "geomed", "flag", "mda", "caf", "median"])
@pytest.mark.parametrize("nnm", [False, True])
def test_nonfinite_rows_never_reach_an_aggregate(name, nnm):
    from raylane.strategies.blocks.aggregators.round import aggregate

    honest = _honest(8, 5)
    G = torch.cat([torch.full((1, 5), float("inf")), honest[:4], torch.full((1, 5), float("nan")), honest[4:]])
    G[2, 1] = float("-inf")       # one bad coordinate is enough
    res, m = aggregate(_pipe(name, 3, nnm=nnm), G, None, [0, 5], True)
    clean = _pipe(name, 0, nnm=nnm).at(0)(G[[1, 3, 4, 6, 7, 8, 9]])   # f' = 3 - 3 dropped = 0
    assert torch.isfinite(res.vector).all()
    assert torch.allclose(res.vector, clean.vector, atol=1e-6)
    assert m["robust/dropped_rows"] == 3 and m["robust/f_used"] == 0
    if res.weights is not None:
        assert float(res.weights[[0, 2, 5]].abs().sum()) == 0
    if res.selected is not None:
        assert not {0, 2, 5} & set(res.selected)


def test_too_few_finite_rows_fail_the_round_with_one_line():
    from raylane.strategies.blocks.aggregators.round import NotEnoughRows, aggregate

    G = torch.full((5, 3), float("nan"))
    with pytest.raises(NotEnoughRows, match=r"5 of 5 rows hold inf/nan.*0 left.*needs") as err:
        aggregate(_pipe("median", 1), G, None, [], False)
    assert "\n" not in str(err.value)
