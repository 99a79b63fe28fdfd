"""The wall-time model against hand-computed examples; the planner refuses a calibration too short to measure."""

import pytest

from raylane import plan
from raylane.comm import Link
from raylane.comm.wire import Traffic
from raylane.validation import ConfigError
from raylane.walltime import System, crossover_gbps, pick_sync_every, step_time_s, time_to_target_s

LINK = Link(bandwidth_gbps=0.1, latency_s=0.001)
DDP = System("ddp", 1, 1, 0, Traffic(1_000_000, 1_000_000, 10, 10))
DILOCO = System("diloco", 50, 1, 0, Traffic(4_000_000, 4_000_000, 6, 6))
STREAMING = System("streaming", 50, 4, 1, Traffic(250_000, 250_000, 6, 6))


def test_step_times_equal_the_hand_computed_ones():
    # ddp: 0.1 s compute + 8e6 bit / 1e8 bit/s + 10 x 1 ms
    assert step_time_s(DDP, 0.1, LINK) == pytest.approx(0.19)
    # diloco H=50: 0.1 + (0.32 + 0.006) / 50
    assert step_time_s(DILOCO, 0.1, LINK) == pytest.approx(0.10652)
    # streaming: a 26 ms fragment sync hides behind one 100 ms step
    assert step_time_s(STREAMING, 0.1, LINK) == pytest.approx(0.1)
    # ... but not on 1 Mbit/s: stall 2.006 - 0.1 per sync, 4/50 syncs per step
    assert step_time_s(STREAMING, 0.1, Link(0.001, 0.001)) == pytest.approx(0.1 + 0.08 * 1.906)
    assert time_to_target_s(DDP, 1000, 0.1, LINK) == pytest.approx(190.0)


def test_a_saturated_link_bounds_the_overlapped_step():
    # tau = 20: two syncs in flight share the link, so the step is the link's 4/50 x 2.006 s, not
    # 0.001 + 4/50 x (2.006 - 20 x 0.001)
    deep = System("streaming", 50, 4, 20, STREAMING.sync_traffic)
    assert step_time_s(deep, 0.001, Link(0.001, 0.001)) == pytest.approx(0.08 * 2.006)


def test_crossover_equals_the_hand_solved_bandwidth():
    # ddp needs 1000 steps, diloco 1500: 1000 (0.11 + 0.008/b) = 1500 (0.10012 + 0.00064/b) -> b = 7.04 / 40.18
    def ddp(gbps):
        return time_to_target_s(DDP, 1000, 0.1, Link(gbps, 0.001))

    def diloco(gbps):
        return time_to_target_s(DILOCO, 1500, 0.1, Link(gbps, 0.001))

    assert crossover_gbps(diloco, ddp) == pytest.approx(7.04 / 40.18, rel=1e-6)
    assert crossover_gbps(ddp, diloco) is None  # ddp is not the faster one on thin links


def test_the_pick_is_the_smallest_h_whose_communication_hides():
    def make(h):
        return System(f"diloco H={h}", h, 1, 0, DILOCO.sync_traffic)

    # a 0.326 s sync: share <= 10% needs 0.326/H <= 0.1 x (0.1 + 0.326/H), i.e. H >= 29.3
    assert pick_sync_every(make, [1, 10, 50, 100], 0.1, LINK) == 50
    assert pick_sync_every(make, [1, 10, 50, 100], 0.1, Link(100.0, 0.0)) == 1


def test_the_planner_refuses_a_calibration_too_short_to_measure(capsys):
    assert plan.main(["--calibration-steps", "3", "model.n_layer=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --calibration-steps=3: too short to measure") and "\n" not in err
    with pytest.raises(ConfigError, match="5 timed steps"):
        plan.calibration_from([0.1] * 7, {"ops": {}, "comm_wait_s": 0.0}, 10, 2)


def test_calibration_takes_compute_as_the_median_step_less_the_comm_wait():
    comm = {"comm_wait_s": 0.2, "ops": {"allreduce": {"bytes_sent": 4000, "bytes_recv": 4000, "messages_sent": 40,
                                                      "messages_recv": 40}}}
    cal = plan.calibration_from([5.0, 5.0] + [0.12] * 8, comm, 1000, 2)
    assert cal.compute_s == pytest.approx(0.12 - 0.02) and cal.ddp_traffic == Traffic(400, 400, 4, 4)
    text = plan.table(cal, LINK, fragments=4, max_share=0.1)
    assert "pick: DiLoCo H=" in text and "streaming diloco H=50 P=4 fp4" in text
