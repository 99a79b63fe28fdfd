"""The fault plan: which fault hits which worker at which step (config group `faults/`).

Each event has a kind, a target and a trigger (`step`, or `prob` per step, seeded by the
run seed and the event's index, so a plan replays exactly). Kinds:
- crash: the worker process dies (`mode: exit` at once, `mode: collective` inside the
  step's first collective); kill: the coordinator `ray.kill`s it;
- node_loss: every worker on the node of worker `rank` dies at once;
- hang: the worker stops responding inside a collective for `hang_s` seconds;
- straggler: the worker's steps are delayed (`straggler:` a StragglerModel — fixed, random,
  bursty or a replayed trace) from `step` (default 1) to `until` (default: the end);
- byzantine: the worker's outgoing tensors are replaced (`mode`: sign_flip, scale,
  gaussian, zeros, nan; `scale`) from `step` to `until` (default: that step only); or, with
  a gradient-exchanging strategy (robust), the colluding omniscient attacks alie (`z`, null:
  the paper's), ipm (`epsilon`), mimic (`target`) and label_flip (workers/chaos.py). Every rank
  of a step with a Byzantine worker learns the step's Byzantine ranks (`colluders`);
- network: the worker's link (all workers' when `rank` is unset) is limited to
  `bandwidth_gbps` and `latency_s` per message, for the whole run;
- driver_crash: the coordinator process dies at `step` (re-running the command resumes).
One-shot kinds fire once per run; fired events are kept in `<run.dir>/faults_fired.json`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from raylane.comm import Link
from raylane.validation import check, one_of
from raylane.workers.chaos import BYZANTINE_MODES, ROW_MODES, Directive
from raylane.stragglers import StragglerModel

KINDS = ("crash", "kill", "node_loss", "hang", "straggler", "byzantine", "network", "driver_crash")
ONE_SHOT = ("crash", "kill", "node_loss", "hang", "driver_crash")
DRIVER_SIDE = ("kill", "node_loss", "driver_crash")


@dataclass
class FaultEvent:
    kind: str
    rank: int | None = None
    step: int | None = None
    prob: float = 0.0
    until: int | None = None
    mode: str | None = None
    hang_s: float = 3600.0
    scale: float = 10.0
    bandwidth_gbps: float = 0.0
    latency_s: float = 0.0
    straggler: StragglerModel = field(default_factory=StragglerModel)
    epsilon: float = 0.1            # byzantine ipm: the Byzantine rows are -epsilon x the honest mean
    z: float | None = None          # byzantine alie: mu - z sigma (null: z from n and f, as the paper)
    target: int = -1                # byzantine mimic: the honest row copied (-1: the paper's choice)

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.kind", self.kind, KINDS)
        check(self.step is None or self.step >= 1, f"{prefix}.step", self.step, "must be >= 1 (steps count from 1)")
        check(self.until is None or self.until >= (self.step or 1), f"{prefix}.until", self.until,
              f"must be >= the event's first step ({self.step or 1})")
        check(self.bandwidth_gbps >= 0, f"{prefix}.bandwidth_gbps", self.bandwidth_gbps, "must be >= 0 (0: unlimited)")
        check(self.latency_s >= 0, f"{prefix}.latency_s", self.latency_s, "must be >= 0")
        if self.kind in ("straggler", "network"):
            return
        check(self.step is not None or self.prob > 0, f"{prefix}.step", self.step,
              f"{self.kind} needs a trigger: step >= 1 or prob in (0, 1]")
        check(0 <= self.prob <= 1, f"{prefix}.prob", self.prob, "must be in [0, 1]")
        if self.kind == "crash":
            one_of(f"{prefix}.mode", self.mode or "exit", ("exit", "collective"))
        if self.kind == "byzantine":
            one_of(f"{prefix}.mode", self.mode, BYZANTINE_MODES)
            check(self.target >= -1, f"{prefix}.target", self.target, "must be an honest row index >= 0, or -1")
        check(self.hang_s > 0, f"{prefix}.hang_s", self.hang_s, "must be > 0")


@dataclass
class FaultsConfig:
    events: list[FaultEvent] = field(default_factory=list)
    detect_outliers: bool = True       # C4-style: name a worker whose time outside collectives departs
    isolate_outliers: bool = False     # ... and replace it
    outlier_factor: float = 3.0
    outlier_window: int = 8
    outlier_min_s: float = 0.05

    def validate(self, prefix: str) -> None:
        check(self.outlier_factor > 1, f"{prefix}.outlier_factor", self.outlier_factor, "must be > 1")
        check(self.outlier_window >= 2, f"{prefix}.outlier_window", self.outlier_window, "must be >= 2")

    def validate_ranks(self, num_workers: int) -> None:
        for i, e in enumerate(self.events):
            key = f"faults.events[{i}].rank"
            needs_rank = e.kind not in ("straggler", "driver_crash", "network")
            if needs_rank:
                check(e.rank is not None, key, e.rank, f"{e.kind} needs a worker rank in [0, {num_workers - 1}]")
            if e.rank is not None:
                check(0 <= e.rank < num_workers, key, e.rank,
                      f"out of range: cluster.num_workers={num_workers} allows ranks 0..{num_workers - 1}")


class FaultPlan:
    def __init__(self, cfg: FaultsConfig, seed: int, fired_path: Path | None = None):
        self.cfg, self.seed, self.fired_path = cfg, seed, fired_path
        self.fired: set[int] = set()
        if fired_path is not None and fired_path.is_file():
            self.fired = set(json.loads(fired_path.read_text()))

    def _fires(self, i: int, e: FaultEvent, step: int) -> bool:
        if e.kind in ONE_SHOT and i in self.fired:
            return False
        first = e.step or 1
        if e.kind in ("straggler", "network"):
            return first <= step <= (e.until or step)
        if e.prob > 0 and step >= first and (e.until is None or step <= e.until):
            return random.Random(f"{self.seed}/fault{i}/{step}").random() < e.prob
        return first <= step <= (e.until or first)

    def _mark(self, i: int, e: FaultEvent) -> None:
        if e.kind in ONE_SHOT:
            self.fired.add(i)
            if self.fired_path is not None:
                self.fired_path.write_text(json.dumps(sorted(self.fired)))

    def directives(self, step: int, world: int) -> dict[int, Directive]:
        """Worker-side faults for `step`, by rank (ranks without one are absent)."""
        out: dict[int, Directive] = {}
        for i, e in enumerate(self.cfg.events):
            if e.kind in DRIVER_SIDE or e.kind == "network" or not self._fires(i, e, step):
                continue
            if e.kind == "straggler":
                for r in range(world):
                    if e.rank is None or e.rank == r:
                        d = out.setdefault(r, Directive())
                        d.delay_s += e.straggler.delay(self.seed, r, step)
                continue
            if e.rank >= world:
                continue
            d = out.setdefault(e.rank, Directive())
            if e.kind == "crash":
                d.crash = e.mode or "exit"
            elif e.kind == "hang":
                d.hang_s = e.hang_s
            elif e.kind == "byzantine":
                d.byzantine, d.byzantine_scale = e.mode, e.scale
                d.epsilon, d.z, d.target = e.epsilon, e.z, e.target
            self._mark(i, e)
        colluders = tuple(sorted(r for r, d in out.items() if d.byzantine))
        if colluders:  # every rank learns the step's Byzantine ranks (ground truth; the colluders' pact)
            rows = tuple((r, out[r].byzantine, out[r].epsilon, out[r].z, out[r].target) for r in colluders
                         if out[r].byzantine in ROW_MODES)
            for r in range(world):
                d = out.setdefault(r, Directive())
                d.colluders, d.row_attacks = colluders, rows
        return {r: d for r, d in out.items() if d}

    def driver_events(self, step: int) -> list[FaultEvent]:
        """Driver-side faults (kill, node_loss, driver_crash) due at `step`; marked fired."""
        due = []
        for i, e in enumerate(self.cfg.events):
            if e.kind in DRIVER_SIDE and self._fires(i, e, step):
                self._mark(i, e)
                due.append(e)
        return due

    def links(self, world: int) -> dict[int, Link]:
        """Emulated links from the network events (a rank of None limits every worker)."""
        out: dict[int, Link] = {}
        for e in self.cfg.events:
            if e.kind == "network":
                for r in range(world):
                    if e.rank is None or e.rank == r:
                        out[r] = Link(e.bandwidth_gbps, e.latency_s)
        return out
