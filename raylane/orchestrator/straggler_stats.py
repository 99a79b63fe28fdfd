"""What a straggler plan did, step by step: the `stragglers/` metrics and the plan's one event.

Stragglers fire every step, so they are not announced per step as crashes are. Instead:
- each step of a run with a straggler plan logs `stragglers/delayed` (workers held back this step),
  `stragglers/delay_s` (the largest delay), `stragglers/delay_total_s` (all delays added),
  `stragglers/wait_s` (how long the round waited on its slow workers: a coded round's `gc/wait_s`,
  else the longest wait in a collective, `comm/wait_s`) and `stragglers/tolerated` (stragglers
  a coded round did not wait for, `gc/stragglers`; 0 for a round that waits for everyone);
- the first step that delays anyone writes one `fault_injected` event (kind `straggler`), so the
  summary's faults line and the chaos table show the plan.
"""

from __future__ import annotations

from typing import Any


def has_plan(faults_cfg: Any) -> bool:
    return any(e.kind == "straggler" for e in faults_cfg.events)


def delays(directives: dict[int, Any]) -> dict[int, float]:
    """Delay (s) per rank from a step's directives (ranks without one are absent)."""
    return {r: d.delay_s for r, d in directives.items() if getattr(d, "delay_s", 0.0) > 0}


def step_metrics(delayed: dict[int, float], metrics: dict[str, Any]) -> dict[str, float]:
    """The `stragglers/` metrics of one step from its delays and the metrics the step logged."""
    wait = metrics.get("gc/wait_s", metrics.get("comm/wait_s", 0.0)) or 0.0
    return {"stragglers/delayed": float(len(delayed)), "stragglers/delay_s": max(delayed.values(), default=0.0),
            "stragglers/delay_total_s": float(sum(delayed.values())), "stragglers/wait_s": float(wait),
            "stragglers/tolerated": float(metrics.get("gc/stragglers", 0))}
