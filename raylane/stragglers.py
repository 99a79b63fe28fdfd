"""Straggler delay models: how long worker `rank` is held back at step `step`.

Every model is a pure function of (seed, rank, step), so a run can be replayed exactly.
- `fixed`: always `delay_s`.
- `random`: exponential with mean `delay_s`.
- `bursty`: a two-state on/off Markov chain per worker (enter a burst with probability
  `p_on`, leave it with `p_off`); `delay_s` while on, 0 while off.
- `trace`: replay measured per-round times (CSV: a `round` column, then one column per
  worker, seconds) — e.g. the AWS Lambda traces of the Sequential Gradient Coding
  authors. Worker i of n takes column i; a round's delay is its time minus that round's
  fastest time, times `scale` (to bring Lambda seconds to local step times); rounds wrap.
- `trace_load`: replay as the SGC authors' simulator does: a worker's whole response time in
  the round, from the profile measured at the computational load the scheme gives each worker
  (`delay(..., load=L)`, L = the fraction of a job's data per worker), times `scale`. `trace`
  names one profile `<prefix>-loadXXXX.csv` (XXXX = load x 1000); its siblings with other
  loads are read too, and L is interpolated linearly between the two nearest (clamped at the
  ends). Coding that gives a worker more data makes it slower, as on the real workers.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from raylane.validation import check, one_of

MODELS = ("fixed", "random", "bursty", "trace", "trace_load")


@dataclass
class StragglerModel:
    model: str = "fixed"
    delay_s: float = 0.5
    p_on: float = 0.1
    p_off: float = 0.5
    trace: str | None = None       # CSV path for model=trace
    scale: float = 0.05
    ranks: list[int] = field(default_factory=list)   # empty: every rank (fixed/random/bursty); trace: all

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.model", self.model, MODELS)
        check(self.delay_s >= 0, f"{prefix}.delay_s", self.delay_s, "must be >= 0")
        check(0 <= self.p_on <= 1, f"{prefix}.p_on", self.p_on, "must be in [0, 1]")
        check(0 <= self.p_off <= 1, f"{prefix}.p_off", self.p_off, "must be in [0, 1]")
        check(self.scale >= 0, f"{prefix}.scale", self.scale, "must be >= 0")
        if self.model in ("trace", "trace_load"):
            check(self.trace is not None and Path(self.trace).is_file(), f"{prefix}.trace", self.trace,
                  "must be a readable CSV of per-round worker times")
        if self.model == "trace_load":
            check(_LOAD.search(Path(self.trace).name) is not None, f"{prefix}.trace", self.trace,
                  "model=trace_load needs a profile named <prefix>-loadXXXX.csv (XXXX: load x 1000)")
        if self.model in ("trace", "trace_load"):
            paths = load_profiles(self.trace).values() if self.model == "trace_load" else [self.trace]
            for path in paths:
                problem = trace_problem(path)
                check(problem is None, f"{prefix}.trace", self.trace, f"{problem}; a trace is a CSV with an optional "
                                                                      "`round` column, then one number per worker")

    def delay(self, seed: int, rank: int, step: int, load: float = 0.0) -> float:
        """Seconds rank `rank` is delayed at 1-based step `step` (`load`: trace_load's work per worker)."""
        if self.ranks and rank not in self.ranks:
            return 0.0
        if self.model == "fixed":
            return self.delay_s
        if self.model == "random":
            return random.Random(f"{seed}/{rank}/{step}/random").expovariate(1 / self.delay_s) \
                if self.delay_s > 0 else 0.0
        if self.model == "bursty":
            return self.delay_s if _bursty_on(seed, rank, step, self.p_on, self.p_off) else 0.0
        if self.model == "trace_load":
            rows = profile_at_load(self.trace, load)
            row = rows[(step - 1) % len(rows)]
            return row[rank % len(row)] * self.scale
        rows = load_trace(self.trace)
        row = rows[(step - 1) % len(rows)]
        return (row[rank % len(row)] - min(row)) * self.scale


_CHAINS: dict[tuple, list[bool]] = {}


def _bursty_on(seed: int, rank: int, step: int, p_on: float, p_off: float) -> bool:
    """State at `step` of a seeded on/off Markov chain (states cached, extended as needed)."""
    states = _CHAINS.setdefault((seed, rank, p_on, p_off), [])
    while len(states) < step:
        u = random.Random(f"{seed}/{rank}/{len(states)}/bursty").random()
        prev = states[-1] if states else False
        states.append((u >= p_off) if prev else (u < p_on))
    return states[step - 1]


_LOAD = re.compile(r"-load(\d{4})\.csv$")


def load_profiles(path: str) -> dict[float, str]:
    """{load: CSV path} of the profiles beside `path` (named <prefix>-loadXXXX.csv)."""
    p = Path(path)
    prefix = _LOAD.sub("", p.name)
    return {int(m.group(1)) / 1000: str(f) for f in sorted(p.parent.glob(f"{prefix}-load*.csv"))
            if (m := _LOAD.search(f.name)) is not None}


@lru_cache(maxsize=32)
def profile_at_load(path: str, load: float) -> list[list[float]]:
    """Per-round worker response times at `load`, interpolated between the nearest profiles."""
    profiles = load_profiles(path)
    loads = sorted(profiles)
    lo = max([x for x in loads if x <= load], default=loads[0])
    hi = min([x for x in loads if x >= load], default=loads[-1])
    a, b = load_trace(profiles[lo]), load_trace(profiles[hi])
    w = 0.0 if hi == lo else (load - lo) / (hi - lo)
    return [[(1 - w) * x + w * y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def trace_problem(path: str) -> str | None:
    """Why the trace CSV at `path` cannot be replayed (empty, no rows, a cell that is not a
    number), or None when every row parses."""
    try:
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return f"{path} cannot be read as CSV text ({type(e).__name__})"
    if not rows:
        return f"{path} is empty"
    first = 1 if rows[0][0] == "round" else 0
    if len(rows) == 1:
        return f"{path} has a header and no rounds"
    for i, row in enumerate(rows[1:], start=2):
        cells = row[first:]
        if not cells:
            return f"{path} line {i} has no worker times"
        for cell in cells:
            try:
                value = float(cell)
            except ValueError:
                return f"{path} line {i}: {cell!r} is not a number"
            if not value >= 0:  # also NaN
                return f"{path} line {i}: {cell!r} is not a time >= 0"
    return None


@lru_cache(maxsize=8)
def load_trace(path: str) -> list[list[float]]:
    """Rows of per-worker round times (seconds) from a trace CSV."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        first = 1 if header and header[0] == "round" else 0
        return [[float(v) for v in row[first:]] for row in reader if row]
