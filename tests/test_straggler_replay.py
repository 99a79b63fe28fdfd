"""The SGC authors' replay of the Lambda profiles (straggler model `trace_load`) and the trace-only
limit the stragglers benchmark reports beside each scheme (benchmarks/straggler_sim.py)."""

import os

import pytest

from benchmarks.straggler_sim import round_end, trace_only
from raylane.strategies.gradient_coding.codes import make_code
from raylane.strategies.gradient_coding.sgc import BurstyModel, GCSchedule, SRSGCSchedule
from raylane.validation import ConfigError
from raylane.stragglers import StragglerModel, load_trace

TRACE = "/work/shared/data/stragglers/lambda-canada-w256-load0000.csv"
needs_trace = pytest.mark.skipif(not os.path.exists(TRACE), reason="shared straggler traces not present")


@needs_trace
def test_trace_load_replays_whole_response_times_at_the_schemes_load():
    m = StragglerModel(model="trace_load", trace=TRACE, scale=0.5)
    m.validate("strategy.stragglers")
    at = {load: load_trace(TRACE.replace("load0000", f"load{int(load * 1000):04d}")) for load in (0.0, 0.25)}
    assert m.delay(0, 3, 2, load=0.0) == pytest.approx(0.5 * at[0.0][1][3])      # not minus the fastest
    assert m.delay(0, 3, 2, load=0.125) == pytest.approx(0.25 * (at[0.0][1][3] + at[0.25][1][3]))
    assert m.delay(0, 3, 32, load=0.25) == m.delay(0, 3, 2, load=0.25)            # 30 rounds, then it wraps
    busy = sum(m.delay(0, r, k, 1.0) for r in range(8) for k in range(1, 31))
    idle = sum(m.delay(0, r, k, 0.0) for r in range(8) for k in range(1, 31))
    assert busy > 1.5 * idle, "more data per worker must mean slower rounds"


def test_trace_load_needs_a_profile_named_by_its_load(tmp_path):
    other = tmp_path / "times.csv"
    other.write_text("round,w0\n0,1.0\n")
    with pytest.raises(ConfigError, match="strategy.stragglers.trace.*loadXXXX"):
        StragglerModel(model="trace_load", trace=str(other)).validate("strategy.stragglers")


def test_a_gc_round_ends_when_its_answers_decode_and_waits_for_all_when_they_cannot():
    gc = GCSchedule(make_code(4, 1, "frc"))              # groups {0, 1}, {2, 3}
    gc.begin()
    assert round_end(gc, {0: 1.0, 1: 5.0, 2: 2.0, 3: 9.0}, "fastest", 0.5) == (2.0, frozenset({1, 3}))
    assert round_end(gc, {0: 1.0, 1: 5.0, 2: 7.0, 3: 9.0}, "fastest", 0.5) == (7.0, frozenset({3}))
    assert round_end(gc, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, "silence", 0.5)[0] == 1.0


def test_sgc_rounds_wait_out_the_patience_and_the_limit_sums_every_round():
    sr = SRSGCSchedule(make_code(4, 1, "crc"), BurstyModel(1, 2, 1))   # s = 1
    sr.begin()
    # fastest rule: answers at 1.0 and 1.2 and 1.4; patience ends at 1.5; worker 3 is declared at 1.5
    assert round_end(sr, {0: 1.0, 1: 1.2, 2: 1.4, 3: 4.0}, "fastest", 0.5) == (1.5, frozenset({3}))
    times = {(i, r): 1.0 + (3.0 if (i, r) == (3, 2) else 0.0) for i in range(4) for r in range(1, 5)}
    durations = trace_only(SRSGCSchedule(make_code(4, 1, "crc"), BurstyModel(1, 2, 1)),
                           lambda i, r: times.get((i, r), 1.0), 3, "fastest", 0.5)
    assert durations == [1.0, 1.5, 1.0]  # round 2 declares worker 3 at (1 + mu) x 1.0; no job left to flush
