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
from raylane.strategies import attacks
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
