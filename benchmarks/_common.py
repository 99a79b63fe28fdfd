"""Helpers shared by the benchmark scripts: machine description, result files, claims."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - description only
        gpu = "unknown GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, {gpu}, {platform.machine()}, Python {platform.python_version()}, "
            f"load average at the end {load}")


def claim(name: str, value: float, goal: str, holds: bool) -> dict[str, Any]:
    return {"claim": name, "value": round(value, 4), "goal": goal, "holds": bool(holds)}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def write(name: str, rows: list[dict], claims: list[dict], notes: str = "") -> Path:
    """benchmarks/results/<name>.json and <name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": "python " + " ".join(sys.argv), "machine": machine(),
           "rows": rows, "claims": claims, "notes": notes}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {name}", "", f"`{doc['command']}` on {doc['machine']}", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += ["", "| claim | value | goal | holds |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['value']} | {c['goal']} | {c['holds']} |" for c in claims]
    if notes:
        lines += ["", notes]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.json"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def train_and_read(cfg: Any) -> tuple[Any, list[dict]]:
    """Run `cfg` with raylane's Coordinator on the connected Ray: (its summary, its metrics.jsonl rows)."""
    from raylane.orchestrator.coordinator import Coordinator

    coord = Coordinator(cfg)
    try:
        summary = coord.train()
    finally:
        coord.close()
    return summary, [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
