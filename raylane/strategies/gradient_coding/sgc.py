"""Round-by-round schedules of gradient codes: GC (T = 0), SR-SGC and M-SGC (Krishnan, Ebrahimi,
Khisti, "Sequential Gradient Coding For Straggler Mitigation", ICLR 2023).

Job t (one gradient) is issued in round t and must be decoded by the end of round t + T.
Each round every worker gets a list of `Task`s (minitasks, possibly of several jobs); a worker
that has not answered when the round ends is a straggler of that round and its tasks of that
round are lost. Call order: `begin(new_job)` (or `begin_flush()`) -> `acceptable(S)` any number
of times while answers arrive -> `end(S)`, which returns the jobs that became decodable.

Straggler model, (B, W, lambda)-bursty: in every window of W consecutive rounds at most lambda
distinct workers straggle, and each worker's straggling rounds in the window lie within B
consecutive rounds. `BurstyModel.allows(history, S)` checks one more round against it;
`Schedule.allows(S)` checks it against the schedule's own history, where SR-SGC leaves out
*exempt* rounds (the authors' rule: a round with <= s stragglers and no reattempts decoded its
own job at once and leaves nothing to repair, so its stragglers do not count).

Schemes, for n workers:
- `GCSchedule`: each round each worker computes its row of an (n, s) code for the round's job.
  T = 0, load (s+1)/n; s = 0 is uncoded (wait for all).
- `SRSGCSchedule` (selective reattempt): an (n, s) code, s = ceil(B lambda / (W-1+B)), T = B,
  B | (W-1). When job t cannot be decoded after round t, some of its non-contributing workers
  redo their job-t row in round t+B instead of their job-(t+B) row: the fewest, in order
  (round-t stragglers first: the model forbids them to straggle again in round t+B), whose rows
  make the job decodable (`GradientCode.completion`; v - s of the v non-contributors for a
  code where any n - s rows decode; the decodability, not the row count, decides).
- `MSGCSchedule` (multiplexed): a job's data is D1 (W-1 uncoded chunks per worker) plus D2
  (B groups, each under an (n, lambda) code); T = W-2+B. In round r a worker computes W-1+B
  equal-size minitasks; slot m is for job r-m: slots m < W-1 do D1 chunk m; slot W-1+g does
  the D2 group-g row, unless the worker still misses a D1 chunk of that job, which it redoes
  instead. Load (lambda+1)(W-1+B) / (n(B + (W-1)(lambda+1))); with lambda = n there is no D2.

`begin_flush()` starts a round that issues no job and assigns whatever completes every pending
job; the driver waits for all in it (a barrier, used before checkpoints and at the end).
Data layout: a job's global batch is cut into `atoms` contiguous, near-equal pieces;
`parts(worker, task)` lists the (first atom, atom count, coefficient) the worker combines
(adjacent atoms with one coefficient merged: FRC rows are one contiguous range).
Pure Python plus the codes; no Ray, no torch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from raylane.strategies.gradient_coding.codes import GradientCode

Part = tuple[int, int, float]


def merge(parts: list[Part]) -> list[Part]:
    """Join adjacent parts with equal coefficients: a worker computes each part in one pass."""
    out: list[Part] = []
    for first, count, coeff in sorted(parts):
        if out and out[-1][0] + out[-1][1] == first and out[-1][2] == coeff:
            out[-1] = (out[-1][0], out[-1][1] + count, coeff)
        else:
            out.append((first, count, coeff))
    return out


@dataclass(frozen=True)
class Task:
    job: int
    kind: str        # "row": the worker's row of the job's code | "d1": D1 chunk | "d2": D2 group row
    index: int = 0   # d1: chunk, d2: group


@dataclass(frozen=True)
class BurstyModel:
    B: int
    W: int
    lam: int

    def allows(self, history: Sequence[frozenset[int]], stragglers: Iterable[int]) -> bool:
        """Whether straggler set `stragglers` in the next round keeps the pattern in the model.
        `history`: the straggler sets of the previous rounds, oldest first."""
        s = frozenset(stragglers)
        recent = history[max(0, len(history) - (self.W - 1)):]
        if len(s.union(*recent)) > self.lam:
            return False
        for k in range(self.B, self.W):  # a straggle k rounds ago with B <= k <= W-1 spans > B rounds
            if k <= len(history) and s & history[-k]:
                return False
        return True


class Schedule:
    """Shared bookkeeping: rounds, issued/decoded jobs, received tasks, straggler history."""

    name = "base"
    T = 0
    model: BurstyModel | None = None
    eager = False      # True: a round may end as soon as it is acceptable (no memory of past rounds)

    def __init__(self, n: int, atoms: int, load: float, history_len: int):
        self.n, self.atoms, self.load, self.history_len = n, atoms, load, history_len
        self.round = 0
        self.issued: set[int] = set()
        self.decoded: set[int] = set()
        self.received: set[tuple[int, Task]] = set()
        self.history: list[frozenset[int]] = []
        self.exempt: list[bool] = []   # per history entry: leave its stragglers out of the model
        self.current: dict[int, list[Task]] = {}
        self.flushing = False

    # -- a round ------------------------------------------------------------------------
    def begin(self, new_job: bool = True) -> dict[int, list[Task]]:
        """Start the next round (issuing job = round when `new_job`); the tasks of every worker."""
        self.round += 1
        self.flushing = False
        if new_job:
            self.issued.add(self.round)
        self.current = self._assign(self.round)
        return self.current

    def begin_flush(self) -> dict[int, list[Task]]:
        """Start a round that completes every pending job if every worker answers."""
        self.round += 1
        self.flushing = True
        self.current = self._completion()
        return self.current

    def acceptable(self, stragglers: Iterable[int]) -> bool:
        """Whether the round may end with `stragglers` unanswered: the model holds (SGC) and every
        job due by this round decodes."""
        s = frozenset(stragglers)
        if self.flushing:
            return not s
        if not self.allows(s):
            return False
        return self.deadlines_met(s)

    def allows(self, stragglers: Iterable[int]) -> bool:
        """Whether the straggler model (if any) admits `stragglers` in this round."""
        return self.model is None or self.model.allows(self.model_history(), stragglers)

    def model_history(self) -> list[frozenset[int]]:
        """The history the straggler model sees: exempt rounds count as straggler-free."""
        return [frozenset() if ex else h for h, ex in zip(self.history, self.exempt)]

    def deadlines_met(self, stragglers: frozenset[int]) -> bool:
        got = self.received | self._delivered(stragglers)
        return all(self.decodable(t, got) for t in self.pending() if t + self.T <= self.round)

    def end(self, stragglers: Iterable[int]) -> list[int]:
        """Close the round with `stragglers` unanswered; the jobs that became decodable, in order."""
        s = frozenset(stragglers)
        self.exempt = (self.exempt + [not self.flushing and self._exempt(s)])[-self.history_len:]
        self.received |= self._delivered(s)
        self.history = (self.history + [s])[-self.history_len:]
        ready = [t for t in self.pending() if self.decodable(t, self.received)]
        self.decoded.update(ready)
        return ready

    def forget(self, job: int) -> None:
        """Drop the bookkeeping of a decoded job."""
        self.received = {(i, task) for i, task in self.received if task.job != job}

    def pending(self) -> list[int]:
        return sorted(self.issued - self.decoded)

    def _exempt(self, stragglers: frozenset[int]) -> bool:
        """Whether this round, ending with `stragglers`, stays out of the straggler model."""
        return False

    def _delivered(self, stragglers: frozenset[int]) -> set[tuple[int, Task]]:
        return {(i, task) for i, tasks in self.current.items() if i not in stragglers for task in tasks}

    def clone(self) -> "Schedule":
        other = copy.copy(self)
        other.issued, other.decoded, other.received = set(self.issued), set(self.decoded), set(self.received)
        other.history, other.current, other.exempt = list(self.history), dict(self.current), list(self.exempt)
        return other

    def state_key(self) -> tuple:
        """What the future of this schedule depends on, relative to the current round."""
        r = self.round
        got = frozenset((i, Task(task.job - r, task.kind, task.index)) for i, task in self.received
                        if task.job not in self.decoded)
        return tuple(self.history), tuple(self.exempt), got, tuple(t - r for t in self.pending())

    # -- per scheme ---------------------------------------------------------------------
    def _assign(self, rnd: int) -> dict[int, list[Task]]:
        raise NotImplementedError

    def _completion(self) -> dict[int, list[Task]]:
        raise NotImplementedError

    def decodable(self, job: int, received: set[tuple[int, Task]]) -> bool:
        raise NotImplementedError

    def decoding(self, job: int) -> list[tuple[int, Task, float]]:
        """(worker, task, coefficient): the received results whose combination is the job's full sum."""
        raise NotImplementedError

    def parts(self, worker: int, task: Task) -> list[Part]:
        raise NotImplementedError


class _RowSchedule(Schedule):
    """Schemes where a job is one (n, s) code over n partitions: each worker sends its row."""

    def __init__(self, code: GradientCode, history_len: int):
        super().__init__(code.n, code.n, (code.s + 1) / code.n, history_len)
        self.code = code

    def contributors(self, job: int, received: set[tuple[int, Task]]) -> set[int]:
        row = Task(job, "row")
        return {i for i in range(self.n) if (i, row) in received}

    def decodable(self, job: int, received: set[tuple[int, Task]]) -> bool:
        return self.code.can_decode(self.contributors(job, received))

    def decoding(self, job: int) -> list[tuple[int, Task, float]]:
        coeffs = self.code.decode(self.contributors(job, self.received))
        assert coeffs is not None, f"job {job} is not decodable"
        return [(i, Task(job, "row"), a) for i, a in coeffs.items()]

    def parts(self, worker: int, task: Task) -> list[Part]:
        return merge([(j, 1, c) for j, c in self.code.support(worker)])

    def _completion(self) -> dict[int, list[Task]]:
        tasks: dict[int, list[Task]] = {i: [] for i in range(self.n)}
        for t in self.pending():
            for i in set(range(self.n)) - self.contributors(t, self.received):
                tasks[i].append(Task(t, "row"))
        return tasks


class GCSchedule(_RowSchedule):
    """Gradient coding, T = 0: every job decodes in its own round (s = 0: uncoded)."""

    eager = True

    def __init__(self, code: GradientCode):
        super().__init__(code, history_len=1)
        self.name = "gc" if code.s else "uncoded"

    def _assign(self, rnd: int) -> dict[int, list[Task]]:
        return {i: [Task(rnd, "row")] if rnd in self.issued else [] for i in range(self.n)}


def sr_sgc_s(B: int, W: int, lam: int) -> int:
    """The per-round tolerance of SR-SGC's code: ceil(B lambda / (W - 1 + B))."""
    return math.ceil(B * lam / (W - 1 + B))


class SRSGCSchedule(_RowSchedule):
    name = "sr_sgc"

    def __init__(self, code: GradientCode, model: BurstyModel):
        assert (model.W - 1) % model.B == 0 and code.s == sr_sgc_s(model.B, model.W, model.lam)
        super().__init__(code, history_len=model.W - 1)
        self.model, self.T = model, model.B

    def _assign(self, rnd: int) -> dict[int, list[Task]]:
        tasks = {i: [Task(rnd, "row")] if rnd in self.issued else [] for i in range(self.n)}
        t = rnd - self.model.B
        if t in self.issued and t not in self.decoded:
            have = self.contributors(t, self.received)
            missing = sorted(set(range(self.n)) - have)
            stragglers_then = self.history[-self.model.B] if len(self.history) >= self.model.B else frozenset()
            missing.sort(key=lambda i: i not in stragglers_then)  # stable: round-t stragglers first
            redo = self.code.completion(have, missing)
            for i in missing if redo is None else redo:  # None: even all of them cannot decode; all redo
                tasks[i] = [Task(t, "row")]
        return tasks

    def _exempt(self, stragglers: frozenset[int]) -> bool:
        """<= s stragglers and every worker on this round's own job: the job decodes now."""
        return len(stragglers) <= self.code.s and all(task.job == self.round for tasks in self.current.values()
                                                      for task in tasks)


def m_sgc_load(n: int, B: int, W: int, lam: int) -> float:
    if lam >= n:
        return (W - 1 + B) / (n * (W - 1))
    return (lam + 1) * (W - 1 + B) / (n * (B + (W - 1) * (lam + 1)))


class MSGCSchedule(Schedule):
    name = "m_sgc"

    def __init__(self, n: int, model: BurstyModel, code: GradientCode | None):
        """`code`: the (n, lambda) code of each D2 group; None when lambda = n (no D2)."""
        B, W, lam = model.B, model.W, model.lam
        assert code is None or (code.n, code.s) == (n, lam)
        self.chunk = lam + 1 if code is not None else 1          # atoms per minitask
        self.d2_start = n * (W - 1) * self.chunk
        super().__init__(n, self.d2_start + (B * n if code is not None else 0), m_sgc_load(n, B, W, lam), W - 1)
        self.model, self.code, self.T = model, code, W - 2 + B

    def _missing_d1(self, worker: int, job: int, received: set[tuple[int, Task]]) -> list[int]:
        return [k for k in range(self.model.W - 1) if (worker, Task(job, "d1", k)) not in received]

    def _assign(self, rnd: int) -> dict[int, list[Task]]:
        d1 = self.model.W - 1
        tasks: dict[int, list[Task]] = {i: [] for i in range(self.n)}
        for i in range(self.n):
            for m in range(d1 + self.model.B):
                t = rnd - m
                if t not in self.issued or t in self.decoded:
                    continue
                missing = self._missing_d1(i, t, self.received) if m >= d1 else [m]
                if m < d1 or missing:
                    tasks[i].append(Task(t, "d1", missing[0]))
                elif self.code is not None:
                    tasks[i].append(Task(t, "d2", m - d1))
        return tasks

    def _group(self, job: int, g: int, received: set[tuple[int, Task]]) -> set[int]:
        return {i for i in range(self.n) if (i, Task(job, "d2", g)) in received}

    def decodable(self, job: int, received: set[tuple[int, Task]]) -> bool:
        if any(self._missing_d1(i, job, received) for i in range(self.n)):
            return False
        return self.code is None or all(self.code.can_decode(self._group(job, g, received))
                                        for g in range(self.model.B))

    def decoding(self, job: int) -> list[tuple[int, Task, float]]:
        plan = [(i, Task(job, "d1", k), 1.0) for i in range(self.n) for k in range(self.model.W - 1)]
        for g in range(self.model.B if self.code is not None else 0):
            coeffs = self.code.decode(self._group(job, g, self.received))
            assert coeffs is not None, f"job {job} group {g} is not decodable"
            plan += [(i, Task(job, "d2", g), a) for i, a in coeffs.items()]
        return plan

    def parts(self, worker: int, task: Task) -> list[Part]:
        if task.kind == "d1":
            return [((worker * (self.model.W - 1) + task.index) * self.chunk, self.chunk, 1.0)]
        first = self.d2_start + task.index * self.n
        return merge([(first + j, 1, c) for j, c in self.code.support(worker)])

    def _completion(self) -> dict[int, list[Task]]:
        tasks: dict[int, list[Task]] = {i: [] for i in range(self.n)}
        for t in self.pending():
            for i in range(self.n):
                tasks[i] += [Task(t, "d1", k) for k in self._missing_d1(i, t, self.received)]
            for g in range(self.model.B if self.code is not None else 0):
                if not self.code.can_decode(self._group(t, g, self.received)):
                    for i in set(range(self.n)) - self._group(t, g, self.received):
                        tasks[i].append(Task(t, "d2", g))
        return tasks
