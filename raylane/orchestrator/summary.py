"""The end-of-run summary: final train/eval loss, steps, wall time, bytes on the wire."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Summary:
    steps: int = 0
    eval_loss: float | None = None
    eval_step: int | None = None
    first_loss: float | None = None
    wall_s: float = 0.0
    bytes_sent_total: int = 0
    tokens_total: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def train_loss(self) -> float | None:
        """Mean train loss over the last (up to) 20 steps."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def record_step(self, step: int, loss: float, bytes_sent: int, tokens: int) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        self.steps = step
        self.recent.append(loss)
        self.bytes_sent_total += bytes_sent
        self.tokens_total += tokens

    def record_eval(self, step: int, loss: float) -> None:
        self.eval_loss, self.eval_step = loss, step

    def state_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in vars(self).items() if k != "recent"}, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, deque(v, maxlen=20) if k == "recent" else v)

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "first_train_loss": self.first_loss, "final_train_loss": self.train_loss,
                "final_eval_loss": self.eval_loss, "wall_s": self.wall_s,
                "bytes_on_wire": self.bytes_sent_total, "tokens": self.tokens_total}

    def table(self) -> str:
        def fmt(v: Any) -> str:
            return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

        gib = self.bytes_sent_total / 2**30
        rows = [("steps", fmt(self.steps)), ("first train loss", fmt(self.first_loss)),
                ("final train loss", fmt(self.train_loss)), ("final eval loss", fmt(self.eval_loss)),
                ("wall time (s)", f"{self.wall_s:.1f}"),
                ("bytes on the wire", f"{self.bytes_sent_total:,} ({gib:.3f} GiB)"),
                ("tokens/s", f"{self.tokens_total / self.wall_s:,.0f}" if self.wall_s else "-")]
        width = max(len(k) for k, _ in rows)
        lines = ["", "raylane summary", "-" * (width + 24)]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines)
