"""The trace-only limit of a gradient-coding scheme: raylane's own round rule replayed on the
injected delays alone, with compute and communication free.

Each round: the scheme's schedule assigns tasks; worker i answers at `times(i, round)` seconds
(the same delay the benchmark injects, at the scheme's load); the round ends at the first moment
the driver would end it (gc_patience.py's rule, then `schedule.acceptable`), exactly as
`CodedDriver._collect` decides; then a flush round waits for every worker. What remains of a
measured run's time over this limit is raylane's overhead (compute, Ray calls, decoding).
Pure: no Ray, no torch.
"""

from __future__ import annotations

from typing import Callable

from raylane.strategies.gradient_coding.patience import Patience
from raylane.strategies.gradient_coding.sgc import Schedule


def round_end(schedule: Schedule, times: dict[int, float], rule: str, mu: float) -> tuple[float, frozenset[int]]:
    """(when the round ends, the workers declared stragglers) for answers at `times`."""
    patience, pending = Patience(rule, mu), set(times)
    for t in sorted(set(times.values())):  # answers at the same moment arrive together
        if patience.first is not None and patience.until < t and schedule.acceptable(pending):
            return patience.until, frozenset(pending)  # the patience ran out before these answers
        for rank in [r for r in pending if times[r] == t]:
            pending.discard(rank)
            patience.answered(t)
        if pending and (schedule.eager or patience.out(t)) and schedule.acceptable(pending):
            return t, frozenset(pending)
    return max(times.values(), default=0.0), frozenset()


def trace_only(schedule: Schedule, times: Callable[[int, int], float], rounds: int, rule: str,
               mu: float) -> list[float]:
    """Round durations of `rounds` jobs and the final flush (if any job is still in flight)."""
    durations = []
    for _ in range(rounds):
        tasks = schedule.begin(new_job=True)
        end, stragglers = round_end(schedule, {i: times(i, schedule.round) for i, ts in tasks.items() if ts},
                                    rule, mu)
        for job in schedule.end(stragglers):
            schedule.forget(job)
        durations.append(end)
    if schedule.pending():
        tasks = schedule.begin_flush()
        durations.append(max((times(i, schedule.round) for i, ts in tasks.items() if ts), default=0.0))
        schedule.end(frozenset())
    return durations
