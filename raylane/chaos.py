"""Rehearse a fault scenario: `python -m raylane.chaos faults=chaos [overrides]`.

Runs the job twice on one Ray cluster with the same seed — fault-free (`faults=none`),
then with the fault plan — and reports, for each fault, its kind, the worker and step it hit,
its detection time, recovery time and steps lost, and the final losses of both runs. The
report is printed, written to `<faulty run dir>/chaos.json`, and drawn as an HTML page
(`chaos.html`: the fault table, both runs' curves with the faults and recoveries marked).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from raylane import train
from raylane.validation import ConfigError

log = logging.getLogger("raylane")

DETECTABLE = ("crash", "kill", "node_loss", "hang")  # faults that make a round fail (and are recovered)


def _events(run_dir: Path) -> list[dict[str, Any]]:
    from raylane.orchestrator.metrics import read_records

    return [x for x in read_records(run_dir / "metrics.jsonl") if "event" in x]


def faults_table(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per detected fault: what was injected (kind, worker, step), who failed, detection
    and recovery time, steps lost. An injected fault never detected (a straggler, a byzantine
    worker) has its own row with no detection."""
    rows: list[dict[str, Any]] = []
    injected: list[dict[str, Any]] = []
    detected = None
    for e in events:
        if e["event"] == "fault_injected":
            injected.append(e)
        elif e["event"] == "fault_detected":
            detected = e
        elif e["event"] == "recovered" and detected is not None:
            cause = next((c for c in reversed(injected) if c.get("kind") in DETECTABLE), {})
            if cause:
                injected.remove(cause)
            rows.append({"kind": cause.get("kind", "?"), "rank": cause.get("rank"),
                         "injected_step": cause.get("step"), "step": e["step"], "dead": detected["dead"],
                         "hung": detected["hung"], "detection_s": round(detected["detection_s"], 3),
                         "recovery_s": round(e["recovery_s"], 3), "steps_lost": e["steps_lost"],
                         "source": e["source"], "workers": e["workers"]})
            detected = None
    rows += [{"kind": c.get("kind"), "rank": c.get("rank"), "injected_step": c["step"], "step": None, "dead": [],
              "hung": [], "detection_s": None, "recovery_s": None, "steps_lost": 0, "source": "not detected",
              "workers": None} for c in injected]
    return rows


def console_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'fault':>5}  {'kind':<12} {'worker':>6} {'step':>5} {'detection_s':>11} {'recovery_s':>10} " \
           f"{'steps_lost':>10}  source"
    lines = [head]
    for i, r in enumerate(rows):
        def num(v: Any) -> str:
            return "-" if v is None else str(v)

        lines.append(f"{i:>5}  {r['kind'] or '?':<12} {num(r['rank']):>6} {num(r['injected_step']):>5} "
                     f"{num(r['detection_s']):>11} {num(r['recovery_s']):>10} {r['steps_lost']:>10}  {r['source']}")
    return "\n".join(lines)


def write_html(clean_dir: Path, faulty_dir: Path, rows: list[dict[str, Any]], out: Path) -> None:
    from raylane import report

    table = "<h2>Faults</h2>" + (report.table_html(rows) if rows else "<p>no fault was injected</p>")
    report.write(report.render([clean_dir, faulty_dir], title="raylane chaos report", extra_html=table), out)


def _jobs(overrides: list[str]) -> tuple[Any, Any]:
    faulty = train.build_jobs([*overrides, "resume=false"], multirun=False)[0]
    name = faulty.run.name
    clean = train.build_jobs([*overrides, "faults=none", "resume=false", f"run.name={name}-fault-free"],
                             multirun=False)[0]
    faulty.run.name = f"{name}-faulty"
    return clean, faulty


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raylane.chaos", description=__doc__,
                                epilog=train.presets_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. faults=chaos train.steps=90")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    train.setup_logging()
    try:
        clean, faulty = _jobs(args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return train.EXIT_USER_ERROR
    import ray

    from raylane.orchestrator.coordinator import run

    loopback = train.connect_ray(faulty.cluster)
    try:
        log.info("chaos 1/2: fault-free run -> %s", clean.run.path())
        base = run(clean, loopback)
        log.info("chaos 2/2: run with faults=%s -> %s", faulty.run.name, faulty.run.path())
        hit = run(faulty, loopback)
    finally:
        ray.shutdown()
    rows = faults_table(_events(faulty.run.path()))
    delta = (hit.eval_loss or 0) - (base.eval_loss or 0)
    report = {"faults": rows, "fault_free": base.as_dict(), "faulty": hit.as_dict(), "eval_loss_delta": delta,
              "runs": {"fault_free": str(clean.run.path()), "faulty": str(faulty.run.path())}}
    (faulty.run.path() / "chaos.json").write_text(json.dumps(report, indent=1))
    write_html(clean.run.path(), faulty.run.path(), rows, faulty.run.path() / "chaos.html")
    print("\n" + console_table(rows))
    print(f"final eval loss: fault-free {base.eval_loss:.4f}, with faults {hit.eval_loss:.4f} "
          f"(delta {delta:+.4f}); steps {base.steps} vs {hit.steps}")
    print(f"report: {faulty.run.path() / 'chaos.html'} (data: chaos.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
