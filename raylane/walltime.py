"""Wall-time model of ddp, DiLoCo and Streaming DiLoCo on a link, fed by a run's own measurements.

A system is what it sends: `syncs_per_step` collectives per inner step (ddp: 1; DiLoCo: 1/H;
Streaming DiLoCo: P/H fragment syncs), each of `Traffic` (bytes and messages one rank sends), and
how many inner steps of compute each sync may hide behind (`overlap_steps`, tau). A link is
raylane's `Link` (bandwidth, latency per message): one sync costs `link.delay_s(traffic)` =
bytes*8/bandwidth + latency*messages, exactly what the fault harness's emulated link charges.

Time per inner step (compute c, sync delay d, s = syncs_per_step):
    blocking (tau = 0):       c + s*d
    overlapped (tau >= 1):    max(c + s*max(0, d - tau*c), s*d)
(the second term: syncs in flight share one link, so the link's own time bounds the step.)
Time to a target = the steps the system needs to reach it (measured: the DiLoCo map) x that.
Leaf module: raylane.comm only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from raylane.comm import Link
from raylane.comm.wire import Traffic


@dataclass(frozen=True)
class System:
    """What one rank of a training system sends, and when."""

    name: str
    sync_every: int  # H: inner steps between two syncs of the same parameters (ddp: 1)
    fragments: int  # P: syncs per H steps, each of 1/P of the parameters
    overlap_steps: int  # tau: inner steps a sync may run behind (0: the step waits for it)
    sync_traffic: Traffic  # one sync (one fragment's when P > 1), this rank

    @property
    def syncs_per_step(self) -> float:
        return self.fragments / self.sync_every

    def bytes_per_step(self) -> float:
        return self.syncs_per_step * self.sync_traffic.bytes_sent


def step_time_s(system: System, compute_s: float, link: Link) -> float:
    """Mean wall time of one inner step of `system` at `compute_s` of compute per step on `link`."""
    delay, per_step = link.delay_s(system.sync_traffic), system.syncs_per_step
    if system.overlap_steps == 0:
        return compute_s + per_step * delay
    stall = max(0.0, delay - system.overlap_steps * compute_s)
    return max(compute_s + per_step * stall, per_step * delay)


def time_to_target_s(system: System, steps: int, compute_s: float, link: Link) -> float:
    """Wall time of `steps` inner steps (the steps `system` needs to reach the target loss)."""
    return steps * step_time_s(system, compute_s, link)


def comm_share(system: System, compute_s: float, link: Link) -> float:
    """The fraction of a step's wall time that is communication not hidden behind compute."""
    step = step_time_s(system, compute_s, link)
    return (step - compute_s) / step


def crossover_gbps(faster_on_thin: Callable[[float], float], faster_on_fat: Callable[[float], float],
                   lo_gbps: float = 0.01, hi_gbps: float = 100.0) -> float | None:
    """The bandwidth at which two time-vs-bandwidth curves cross (bisection in log bandwidth), or None if
    `faster_on_thin` is not faster at `lo_gbps` or is still faster at `hi_gbps`."""
    def gap(gbps: float) -> float:
        return faster_on_thin(gbps) - faster_on_fat(gbps)

    if gap(lo_gbps) >= 0 or gap(hi_gbps) < 0:
        return None
    lo, hi = math.log(lo_gbps), math.log(hi_gbps)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(math.exp(mid)) < 0 else (lo, mid)
    return math.exp((lo + hi) / 2)


def pick_sync_every(make: Callable[[int], System], candidates: list[int], compute_s: float, link: Link,
                    max_comm_share: float = 0.1) -> int:
    """The smallest H whose unhidden communication is at most `max_comm_share` of the step on `link`
    (smaller H: closer to ddp's loss); the largest candidate when none is."""
    for h in sorted(candidates):
        if comm_share(make(h), compute_s, link) <= max_comm_share:
            return h
    return max(candidates)
