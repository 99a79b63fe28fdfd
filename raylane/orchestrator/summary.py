"""The end-of-run summary: losses, steps, wall time, throughput, bytes on the wire, faults.

One definition of each number, used by the terminal table, `summary.yaml` and the HTML report:
- final train loss: the mean train loss of the last `FINAL_TRAIN_WINDOW` steps (one step is noisy);
- wall time: the run's training clock (`MetricsSink.elapsed_s`): every session of the run
  added up, so work redone after a fault or a resume is included, worker start-up is not;
- tokens/s: tokens of the steps the run kept (each step counted once) / wall time; `unit` says what a
  "token" is: "tokens" for the char LM, "samples" for classification and graph data (shown as samples/s);
- faults: read from the run's event rows in metrics.jsonl, across every session of the run;
- per-strategy rows (stragglers, attacks, accuracy, stages, plan, replicas, a straggler plan):
  from the metrics logged each step (summary_sections.py), only when the run logged them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from raylane.orchestrator import summary_sections

FINAL_TRAIN_WINDOW = 20
FINAL_TRAIN_LOSS = f"mean of the last {FINAL_TRAIN_WINDOW} steps"


def final_train_loss(losses: Sequence[float]) -> float | None:
    """The one definition of "final train loss": the mean of the last FINAL_TRAIN_WINDOW steps."""
    tail = list(losses)[-FINAL_TRAIN_WINDOW:]
    return sum(tail) / len(tail) if tail else None


def fault_section(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Faults of a run from its event rows: what was injected, detected, recovered, redone."""
    injected = [{"kind": e.get("kind"), "rank": e.get("rank"), "step": e["step"]}
                for e in events if e.get("event") == "fault_injected"]
    first = next((i for i, f in enumerate(injected) if f["kind"] == "straggler"), None)  # once per session:
    injected = [f for i, f in enumerate(injected) if f["kind"] != "straggler" or i == first]  # keep the first
    detection = [e["detection_s"] for e in events if e.get("event") == "fault_detected"]
    recovered = [e for e in events if e.get("event") == "recovered"]
    resumed = [e for e in events if e.get("event") == "resumed"]
    redone = sum(e.get("steps_lost") or 0 for e in recovered) + sum(e.get("steps_redone") or 0 for e in resumed)
    return {"injected": injected, "detected": len(detection), "recovered": len(recovered),
            "resumes": len(resumed), "detection_s": [round(x, 3) for x in detection],
            "recovery_s": [round(e["recovery_s"], 3) for e in recovered], "steps_redone": redone}


def fault_lines(section: dict[str, Any]) -> list[str]:
    """The fault section as short human lines (empty when the run saw no fault)."""
    if not (section.get("injected") or section.get("detected") or section.get("resumes")):
        return []
    what = ", ".join(f"{f['kind']}" + (f" on worker {f['rank']}" if f["rank"] is not None else "")
                     + f" at step {f['step']}" for f in section["injected"]) or "none injected by the plan"

    def span(xs: list[float]) -> str:
        return "-" if not xs else f"{min(xs):.2f} s" if len(xs) == 1 else f"{min(xs):.2f}-{max(xs):.2f} s"

    handled = [f"{section['detected']} detected in {span(section['detection_s'])}" if section["detected"] else
               "0 detected", f"{section['recovered']} recovered" + (f" in {span(section['recovery_s'])}"
                                                                    if section["recovered"] else ""),
               f"{section['resumes']} resume(s)", f"{section['steps_redone']} step(s) redone"]
    return [f"{len(section['injected'])} injected: {what}", ", ".join(handled)]


@dataclass
class Summary:
    steps: int = 0
    eval_loss: float | None = None
    eval_step: int | None = None
    eval_label: str | None = None  # what the eval scores when that is not plain "the model"
    first_loss: float | None = None
    wall_s: float = 0.0
    bytes_sent_total: int = 0
    tokens_total: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=FINAL_TRAIN_WINDOW))
    faults: dict[str, Any] = field(default_factory=dict)
    metric_totals: dict[str, list[float]] = field(default_factory=dict)  # summary_sections.record
    unit: str = "tokens"  # what tokens_total counts: "tokens" (language data) or "samples"

    @property
    def train_loss(self) -> float | None:
        """The final train loss (FINAL_TRAIN_LOSS)."""
        return final_train_loss(self.recent)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_total / self.wall_s if self.wall_s > 0 else None

    def record_step(self, step: int, loss: float, bytes_sent: int, tokens: int) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        self.steps = step
        self.recent.append(loss)
        self.bytes_sent_total += bytes_sent
        self.tokens_total += tokens

    def record_eval(self, step: int, loss: float, label: str | None = None) -> None:
        self.eval_loss, self.eval_step, self.eval_label = loss, step, label

    def record_metrics(self, metrics: dict[str, Any]) -> None:
        """A logged row, for the per-strategy sections (summary_sections)."""
        summary_sections.record(self.metric_totals, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in vars(self).items() if k != "recent"}, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, deque(v, maxlen=FINAL_TRAIN_WINDOW) if k == "recent" else v)

    def as_dict(self) -> dict[str, Any]:
        tps = self.tokens_per_s
        return {"steps": self.steps, "first_train_loss": self.first_loss, "final_train_loss": self.train_loss,
                "final_train_loss_is": FINAL_TRAIN_LOSS, "final_eval_loss": self.eval_loss,
                "eval_of": self.eval_label or "the model", "wall_s": round(self.wall_s, 3),
                "bytes_on_wire": self.bytes_sent_total, "tokens": self.tokens_total,
                "tokens_per_s": None if tps is None else round(tps, 1), "throughput_unit": self.unit,
                "faults": self.faults,
                "strategy": summary_sections.section_dict(self.metric_totals)}

    def table(self) -> str:
        def fmt(v: Any) -> str:
            return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

        gib = self.bytes_sent_total / 2**30
        tps = self.tokens_per_s
        eval_note = f" ({self.eval_label})" if self.eval_label and self.eval_loss is not None else ""
        rows = [("steps", fmt(self.steps)), ("first train loss", fmt(self.first_loss)),
                ("final train loss", f"{fmt(self.train_loss)} ({FINAL_TRAIN_LOSS})"),
                ("final eval loss", fmt(self.eval_loss) + eval_note),
                ("wall time (s)", f"{self.wall_s:.1f} (training, all sessions of the run)"),
                ("bytes on the wire", f"{self.bytes_sent_total:,} ({gib:.3f} GiB)"),
                (f"{self.unit}/s", "-" if tps is None else f"{tps:,.0f} ({self.unit} of the steps kept / wall time)")]
        rows += [("faults", line) for line in fault_lines(self.faults)]
        rows += summary_sections.section_rows(self.metric_totals)
        width = max(len(k) for k, _ in rows)
        lines = ["", "raylane summary", "-" * (width + 24)]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines)
