"""Rehearse a fault scenario: `python -m raylane.chaos faults=chaos [overrides]`.

Runs the job twice on one Ray cluster with the same seed — fault-free (`faults=none`),
then with the fault plan — and reports, for each fault, its detection time, recovery
time and steps lost, and the final losses of both runs. The report is printed and
written to `<run.dir of the faulty run>/chaos.json`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from raylane import train
from raylane.validation import ConfigError


def _events(run_dir) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "event" in x]


def faults_table(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recovered fault: what failed, detection and recovery time, steps lost."""
    rows, detected = [], None
    for e in events:
        if e["event"] == "fault_detected":
            detected = e
        elif e["event"] == "recovered" and detected is not None:
            rows.append({"step": e["step"], "dead": detected["dead"], "hung": detected["hung"],
                         "detection_s": round(detected["detection_s"], 3), "recovery_s": round(e["recovery_s"], 3),
                         "steps_lost": e["steps_lost"], "source": e["source"], "workers": e["workers"]})
            detected = None
    return rows


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        faulty = train.build_jobs([*overrides, "resume=false"], multirun=False)[0]
        name = faulty.run.name
        clean = train.build_jobs([*overrides, "faults=none", "resume=false", f"run.name={name}-fault-free"],
                                 multirun=False)[0]
        faulty.run.name = f"{name}-faulty"
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return train.EXIT_USER_ERROR
    import ray

    from raylane.orchestrator.coordinator import run

    loopback = train.connect_ray(faulty.cluster)
    try:
        base, hit = run(clean, loopback), run(faulty, loopback)
    finally:
        ray.shutdown()
    rows = faults_table(_events(faulty.run.path()))
    report = {"faults": rows, "fault_free": base.as_dict(), "faulty": hit.as_dict(),
              "eval_loss_delta": (hit.eval_loss or 0) - (base.eval_loss or 0)}
    (faulty.run.path() / "chaos.json").write_text(json.dumps(report, indent=1))
    print("\nfault  step  dead  hung  detection_s  recovery_s  steps_lost  source")
    for i, r in enumerate(rows):
        print(f"{i:>5}  {r['step']:>4}  {r['dead']}  {r['hung']}  {r['detection_s']:>11}  {r['recovery_s']:>10}  "
              f"{r['steps_lost']:>10}  {r['source']}")
    print(f"final eval loss: fault-free {base.eval_loss:.4f}, with faults {hit.eval_loss:.4f} "
          f"(delta {report['eval_loss_delta']:+.4f}); steps {base.steps} vs {hit.steps}")
    print(f"report: {faulty.run.path() / 'chaos.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
