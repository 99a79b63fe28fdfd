"""Fault models without Ray: straggler delays, the plan's directives, the emulated link."""

import time
from pathlib import Path

import pytest
import torch

from raylane.comm import Link
from raylane.comm.wire import Traffic
from raylane.orchestrator.faults import FaultEvent, FaultPlan, FaultsConfig
from raylane.workers.chaos import Directive, corruption
from raylane.stragglers import StragglerModel

pytestmark = pytest.mark.timeout(60)

# the shared data folder lies beside the repository
TRACE = str(Path(__file__).resolve().parents[2] / "shared/data/stragglers/lambda-canada-w256-load0000.csv")


def test_straggler_models_are_deterministic_given_seed():
    for model in ("random", "bursty"):
        m = StragglerModel(model=model, delay_s=1.0, p_on=0.2, p_off=0.5)
        a = [m.delay(3, r, t) for r in range(4) for t in range(1, 50)]
        assert a == [m.delay(3, r, t) for r in range(4) for t in range(1, 50)]
        assert a != [m.delay(4, r, t) for r in range(4) for t in range(1, 50)]


def test_bursty_stragglers_come_in_runs():
    m = StragglerModel(model="bursty", delay_s=1.0, p_on=0.1, p_off=0.3)
    on = [m.delay(0, 0, t) > 0 for t in range(1, 2001)]
    runs = sum(1 for a, b in zip(on, on[1:]) if b and not a)
    assert 0.15 < sum(on) / len(on) < 0.35  # stationary share p_on / (p_on + p_off) = 0.25
    assert sum(on) / max(1, runs) > 2  # mean burst length 1 / p_off = 3.3


@pytest.mark.skipif(not __import__("os").path.exists(TRACE), reason="shared straggler traces not present")
def test_trace_replay_gives_each_worker_its_column_minus_the_fastest():
    m = StragglerModel(model="trace", trace=TRACE, scale=1.0)
    delays = [m.delay(0, r, 1) for r in range(256)]
    assert min(delays) == 0.0 and max(delays) > 0
    assert m.delay(0, 5, 31) == m.delay(0, 5, 1)  # 30 rounds, then it wraps


def test_plan_fires_one_shot_faults_once_and_stragglers_every_step(tmp_path):
    cfg = FaultsConfig(events=[FaultEvent(kind="crash", rank=1, step=3),
                               FaultEvent(kind="straggler", straggler=StragglerModel(delay_s=0.2, ranks=[2]))])
    plan = FaultPlan(cfg, seed=0, fired_path=tmp_path / "fired.json")
    assert plan.directives(3, 4) == {1: Directive(crash="exit"), 2: Directive(delay_s=0.2)}
    assert plan.directives(3, 4) == {2: Directive(delay_s=0.2)}  # the retried step does not crash again
    again = FaultPlan(cfg, seed=0, fired_path=tmp_path / "fired.json")  # e.g. after a driver restart
    assert 1 not in again.directives(3, 4)


def test_probabilistic_trigger_is_seeded():
    cfg = FaultsConfig(events=[FaultEvent(kind="byzantine", rank=0, prob=0.3, mode="zeros")])
    fires = [bool(FaultPlan(cfg, seed=5).directives(t, 2)) for t in range(1, 200)]
    assert fires == [bool(FaultPlan(cfg, seed=5).directives(t, 2)) for t in range(1, 200)]
    assert 0.15 < sum(fires) / len(fires) < 0.45


def test_byzantine_corruptions():
    t = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(corruption("sign_flip", 0, 0)(t), -t)
    assert torch.equal(corruption("scale", 10.0, 0)(t), 10 * t)
    assert torch.equal(corruption("zeros", 0, 0)(t), torch.zeros(3))
    assert torch.isnan(corruption("nan", 0, 0)(t)).all()
    assert not torch.equal(corruption("gaussian", 1.0, 0)(t), t)


def _timed_allreduce(comm, numel):
    from raylane.comm import Link as L

    comm.link = L(bandwidth_gbps=0.1, latency_s=0.001)  # 100 Mbit/s
    t = torch.ones(numel)
    t0 = time.monotonic()
    comm.allreduce(t)
    return time.monotonic() - t0, comm.stats.total().bytes_sent, comm.stats.total().messages_sent


def test_emulated_link_paces_an_allreduce_by_its_counted_bytes():
    from tests.multiproc import run_ranks

    for wall, sent, msgs in run_ranks(_timed_allreduce, 2, 250_000):
        expected = Link(0.1, 0.001).delay_s(Traffic(sent, 0, msgs, 0))
        assert sent == 1_000_000 and expected == pytest.approx(0.08 + 0.001 * msgs)
        assert wall >= expected
