"""benchmarks/recovery.py counts both systems alike from their logs (no Ray here)."""

from benchmarks.recovery import CKPT_EVERY, CRASH_STEP, claims_for, measured, raylane_log


def _log(steps, t0=0.0, dt=1.0):
    return [(s, t0 + i * dt) for i, s in enumerate(steps)]


def test_steps_lost_are_the_steps_a_log_shows_completed_more_than_once():
    restart = (CRASH_STEP - 1) // CKPT_EVERY * CKPT_EVERY
    ray_train = _log([*range(1, CRASH_STEP), *range(restart + 1, 41)])  # redoes restart+1 .. crash-1
    in_place = _log(range(1, 41))
    assert measured(ray_train, CRASH_STEP)["steps_lost"] == CRASH_STEP - 1 - restart
    assert measured(in_place, CRASH_STEP)["steps_lost"] == 0
    # the crash step first completes after the redone steps: recovery includes their time
    assert measured(ray_train, CRASH_STEP)["recovery_s"] == CRASH_STEP - 1 - restart


def test_raylane_rows_a_rewind_dropped_count_as_lost_too():
    lines = [{"step": s, "time_s": float(s), "train/loss": 1.0} for s in range(1, 13)]
    lines.insert(8, {"step": 5, "time_s": 8.5, "event": "rewound", "to_step": 5, "steps_redone": 3})
    completions, superseded = raylane_log(lines)
    assert superseded == 3 and measured(completions, 10, superseded)["steps_lost"] == 3


def test_the_ray_train_claim_is_computed_not_asserted():
    row = {"recovery_s": 1.0, "steps_done": 60}
    good = claims_for([{**row, "steps_lost": 0}, {**row, "steps_lost": (CRASH_STEP - 1) % CKPT_EVERY}])
    bad = claims_for([{**row, "steps_lost": 0}, {**row, "steps_lost": 0}])
    name = "Ray Train steps lost"
    assert next(c for c in good if c["claim"] == name)["holds"]
    assert not next(c for c in bad if c["claim"] == name)["holds"]
