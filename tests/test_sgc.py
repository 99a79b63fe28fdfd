"""SR-SGC and M-SGC meet every deadline under every straggler pattern the (B, W, lambda) model
allows (exhaustive for small n), and their decoding covers each job's data exactly once."""

import itertools
import random

import pytest

from raylane.strategies.gradient_coding.codes import CyclicRepetitionCode, make_code
from raylane.strategies.gradient_coding.sgc import (BurstyModel, GCSchedule, MSGCSchedule, Schedule, SRSGCSchedule, m_sgc_load,
                                    sr_sgc_s)


def sr_sgc(n, B, W, lam, kind="crc"):
    return SRSGCSchedule(make_code(n, sr_sgc_s(B, W, lam), kind), BurstyModel(B, W, lam))


def m_sgc(n, B, W, lam, kind="crc"):
    return MSGCSchedule(n, BurstyModel(B, W, lam), make_code(n, lam, kind) if lam < n else None)


def every_allowed_pattern_meets_its_deadlines(schedule: Schedule, rounds: int) -> int:
    """Depth-first over every straggler set each round allows, memoized on the schedule's state.
    Asserts each job decodes by round job + T; returns the number of distinct states visited."""
    n = schedule.n
    subsets = [frozenset(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]
    seen: set = set()

    def visit(s: Schedule, depth: int) -> None:
        if depth == rounds:
            return
        s.begin(new_job=True)
        for stragglers in subsets:
            if not s.allows(stragglers):
                continue
            assert s.acceptable(stragglers), \
                f"round {s.round}: stragglers {set(stragglers)} after {s.history} leave a job undecodable"
            child = s.clone()
            for job in child.end(stragglers):
                child.forget(job)
            assert all(t + s.T > child.round for t in child.pending())
            key = (child.state_key(), depth)
            if key not in seen:
                seen.add(key)
                visit(child, depth + 1)

    visit(schedule, 0)
    return len(seen)


SR_GRID = [(3, 1, 2, 1), (3, 1, 2, 2), (3, 1, 2, 3), (3, 1, 3, 2), (3, 1, 4, 3), (3, 2, 3, 2), (3, 2, 3, 3),
           (3, 2, 5, 2), (4, 1, 2, 2), (4, 1, 2, 4), (4, 1, 3, 3), (4, 2, 3, 2), (4, 2, 3, 4), (4, 2, 5, 2),
           (5, 1, 2, 3)]
MS_GRID = [(3, 1, 2, 1), (3, 1, 2, 2), (3, 1, 2, 3), (3, 1, 3, 2), (3, 1, 4, 3), (3, 2, 3, 2), (3, 2, 3, 3),
           (3, 2, 4, 2), (4, 1, 2, 2), (4, 1, 2, 4), (4, 1, 3, 3), (4, 2, 3, 2), (4, 2, 4, 2), (5, 1, 2, 3)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,B,W,lam", SR_GRID)
def test_sr_sgc_meets_every_deadline_under_every_allowed_pattern(n, B, W, lam):
    schedule = sr_sgc(n, B, W, lam)
    assert schedule.T == B
    assert every_allowed_pattern_meets_its_deadlines(schedule, schedule.T + W + 3) > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,B,W,lam", MS_GRID)
def test_m_sgc_meets_every_deadline_under_every_allowed_pattern(n, B, W, lam):
    schedule = m_sgc(n, B, W, lam)
    assert schedule.T == W - 2 + B
    assert every_allowed_pattern_meets_its_deadlines(schedule, schedule.T + W + 3) > 0


@pytest.mark.parametrize("make", [sr_sgc, m_sgc])
def test_frc_variants_meet_every_deadline_too(make):
    schedule = make(4, 1, 2, 1, kind="frc")  # (s+1) = 2 divides 4
    assert every_allowed_pattern_meets_its_deadlines(schedule, 6) > 0


def test_a_pattern_outside_the_model_is_refused():
    model = BurstyModel(B=1, W=3, lam=2)
    assert model.allows([], {0, 1}) and not model.allows([], {0, 1, 2})
    assert not model.allows([frozenset({0})], {1, 2})       # 3 distinct stragglers in the window
    assert not model.allows([frozenset({0})], {0})           # a burst of 2 > B
    assert not model.allows([frozenset({0}), frozenset()], {0})  # two straggles 2 rounds apart (<= W-1)
    assert model.allows([frozenset({0}), frozenset(), frozenset()], {0})  # 3 apart: a new window


def _atom_weights(schedule: Schedule, job: int) -> list[float]:
    weights = [0.0] * schedule.atoms
    for worker, task, coeff in schedule.decoding(job):
        for first, count, c in schedule.parts(worker, task):
            for atom in range(first, first + count):
                weights[atom] += coeff * c
    return weights


@pytest.mark.parametrize("make,params", [(sr_sgc, (5, 2, 3, 2)), (m_sgc, (5, 2, 3, 2)), (m_sgc, (4, 1, 2, 4)),
                                         (m_sgc, (6, 1, 3, 2))])
def test_decoding_weighs_every_atom_of_a_job_exactly_once(make, params):
    schedule = make(*params)
    rng = random.Random(0)
    decoded = 0
    for _ in range(60):
        schedule.begin(new_job=True)
        options = [set(c) for k in range(3) for c in itertools.combinations(range(schedule.n), k)]
        allowed = [s for s in options if schedule.allows(s)]
        for job in schedule.end(rng.choice(allowed)):
            assert all(abs(w - 1.0) < 1e-9 for w in _atom_weights(schedule, job))
            schedule.forget(job)
            decoded += 1
    assert decoded >= 60 - schedule.T


@pytest.mark.parametrize("n,B,W,lam", [(8, 1, 2, 2), (8, 2, 3, 2), (6, 2, 5, 3)])
def test_m_sgc_computes_its_papers_load_per_round(n, B, W, lam):
    schedule = m_sgc(n, B, W, lam)
    for _ in range(W + B + 2):  # steady state, no stragglers
        tasks = schedule.begin(new_job=True)
        for job in schedule.end(set()):
            schedule.forget(job)
    atoms = {w: sum(c for task in ts for _, c, _ in schedule.parts(w, task)) for w, ts in tasks.items()}
    assert all(a / schedule.atoms == pytest.approx(m_sgc_load(n, B, W, lam)) for a in atoms.values())


def test_sr_sgc_tolerance_and_load_follow_the_paper():
    assert sr_sgc_s(B=1, W=2, lam=2) == 1 and sr_sgc_s(B=2, W=3, lam=3) == 2 and sr_sgc_s(B=1, W=5, lam=4) == 1
    assert sr_sgc(8, 2, 3, 2).load == pytest.approx(2 / 8)


def test_sr_sgc_reattempts_excess_non_contributors_b_rounds_later():
    schedule = sr_sgc(4, 1, 2, 2)      # s = 1
    schedule.begin()
    assert schedule.end({0, 1}) == []  # job 1: two stragglers, one more than s
    tasks = schedule.begin()
    assert [w for w, ts in tasks.items() if ts[0].job == 1] == [0]  # one of them redoes job 1
    assert schedule.end(set()) == [1, 2]  # job 2 still has n - s = 3 rows


def test_gc_decodes_every_job_in_its_own_round_or_waits():
    schedule = GCSchedule(make_code(4, 1, "frc"))
    schedule.begin()
    assert schedule.eager and schedule.acceptable({0}) and not schedule.acceptable({0, 1})
    assert schedule.acceptable({0, 2})  # FRC: one answer per group suffices
    assert schedule.end({0}) == [1]


@pytest.mark.parametrize("make", [sr_sgc, m_sgc])
def test_a_flush_round_completes_every_pending_job_when_all_answer(make):
    schedule = make(4, 2, 3, 2)
    for stragglers in [{0}, {0, 1}, set()]:
        schedule.begin()
        for job in schedule.end(stragglers):
            schedule.forget(job)
    assert schedule.pending()
    schedule.begin_flush()
    assert not schedule.acceptable({3}) and schedule.acceptable(set())
    schedule.end(set())
    assert not schedule.pending()


class _Refusing(CyclicRepetitionCode):
    """A CRC code that cannot decode one responder set (as the 1e-9 residual test once refused)."""

    def __init__(self, n, s, refused):
        super().__init__(n, s)
        self.refused = frozenset(refused)

    def decode(self, responders):
        return None if frozenset(responders) == self.refused else super().decode(responders)


@pytest.mark.parametrize("stragglers", [{0, 1, 7, 9}, {3, 5}])
def test_sr_sgc_reattempts_until_the_job_decodes_not_until_n_minus_s_rows_remain(stragglers):
    """12 workers, B=1 W=2 lambda=7 (s=4): a set the code refuses gets a reattempt, never a stall,
    also with fewer than s non-contributors (where `len(missing) - s` went negative)."""
    code = _Refusing(12, sr_sgc_s(1, 2, 7), set(range(12)) - stragglers)
    schedule = SRSGCSchedule(code, BurstyModel(1, 2, 7))
    schedule.begin()
    assert schedule.acceptable(stragglers) and schedule.end(stragglers) == []
    tasks = schedule.begin()
    redo = [w for w, ts in tasks.items() if ts[0].job == 1]
    assert redo == [min(stragglers)], "one round-1 straggler's row makes job 1 decodable"
    assert schedule.acceptable(set()) and schedule.end(set()) == [1, 2]


def test_sr_sgc_with_12_workers_decodes_the_reviews_straggler_set_in_its_own_round():
    schedule = sr_sgc(12, 1, 2, 7)
    schedule.begin()
    assert schedule.acceptable({0, 1, 7, 9}) and schedule.end({0, 1, 7, 9}) == [1]


def test_sr_sgc_leaves_rounds_with_at_most_s_stragglers_and_no_reattempt_out_of_the_model():
    schedule = sr_sgc(4, 1, 3, 2)          # s = 1, at most 2 distinct stragglers in 3 rounds
    schedule.begin()
    schedule.end({0})                     # <= s stragglers, no reattempt: exempt
    schedule.begin()
    assert schedule.exempt == [True] and schedule.acceptable({1, 2})   # {0} no longer counts
    assert not schedule.model.allows(schedule.history, {1, 2})          # the plain model refuses
    schedule.end({1, 2})                  # 2 > s: job 2 gets a reattempt in round 3
    tasks = schedule.begin()
    assert any(t.job == 2 for ts in tasks.values() for t in ts)
    assert schedule.exempt == [True, False] and not schedule.acceptable({3})  # {1, 2} count: 3 > lambda
    schedule.end(set())
    schedule.begin()
    assert schedule.exempt == [False, False], "a round with a reattempt is never exempt"
