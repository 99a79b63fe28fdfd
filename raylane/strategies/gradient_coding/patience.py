"""When a gradient-coding round may declare its silent workers stragglers (`strategy.straggler_rule`).

Times are seconds since the round began; `first` is the first answer's time.
- `silence` (the default): answers have stopped coming, none for `mu` x `first` since the last
  one. A worker that is merely slower than its peers (a loaded host) keeps the round open as
  long as answers keep arriving, so it is not remembered as a straggler by SR-SGC / M-SGC.
- `fastest` (the SGC authors' rule, their simulator's `wait_time = min(delay) * (1 + mu)`): a
  worker that has not answered by (1 + `mu`) x `first` is a straggler, however the others trickle in.
Either way the round ends only when the schedule accepts the silent set (the pattern stays in
the straggler model and every job due decodes); until then it is a violation and waits for more
answers, at most `strategy.timeout_s`. Pure: no Ray, no clock of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("silence", "fastest")


@dataclass
class Patience:
    rule: str
    mu: float
    first: float | None = None
    until: float = math.inf   # seconds after the round began from which the silent may be declared

    def answered(self, t: float) -> None:
        """A worker answered `t` seconds into the round."""
        if self.first is None:
            self.first = t
            self.until = (1 + self.mu) * t
        if self.rule == "silence":
            self.until = t + self.mu * self.first

    def out(self, t: float) -> bool:
        """Whether the silent workers may be declared stragglers `t` seconds into the round."""
        return t >= self.until
