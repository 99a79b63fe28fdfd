"""gradient_coding: exact gradients despite stragglers, decided on the driver.

Schemes (`scheme`): `uncoded` (wait for all), `gc` (Tandon et al. 2017: an FRC or CRC code,
`s` stragglers per round), `sr_sgc` and `m_sgc` (Krishnan et al. 2023: codes across rounds for
(B, W, lambda)-bursty stragglers, with delay T). Codes: strategies/gradient_coding/codes.py; schedules: strategies/gradient_coding/sgc.py.

One coordinator step issues one job, the gradient of the global batch [offset, offset + G):
1. Every worker gets its tasks (`gc_compute`). A task is a coded combination
   sum_p coeff_p g_p of partition gradients, g_p = (|p| / G) grad(mean loss over p), each
   computed on its own in float32 and combined in float64; the weighted loss rides along as
   one extra coordinate. The vectors come back through Ray and count as `bytes_sent`.
2. The driver `ray.wait`s and ends the round as soon as the workers that have not answered may
   be declared stragglers: gc / uncoded as soon as the job decodes; sr_sgc / m_sgc once
   `straggler_rule` says so (strategies/gradient_coding/patience.py: `silence`, the default, none answered for mu x the
   first answer's time, or `fastest`, the authors' rule, not answered by (1 + mu) x it), the
   pattern stays in the (B, W, lambda) model and every job due decodes (SGC remembers stragglers,
   so a merely slow worker should not be declared one). Where that fails once the patience is out, the round is a
   *violation*: it waits for more answers (up to all), never longer than `timeout_s`, then
   raises. Stragglers' calls are cancelled; late results are never used (the SGC schemes
   re-attempt instead, as the paper prescribes).
3. Each job that became decodable is decoded in float64 (gradient and loss), compressed only
   then if `compression` says so (never a coded message: decoding amplifies its error), and
   every worker applies the same update with the same clipping (`gc_apply`).

Streams: with T > 0, job t is decoded in round t + T, so job t + 1 cannot start from its
update. As in the paper's experiments, the run trains `streams` (>= T + 1) models round-robin:
job k (1-based) trains stream (k - 1) mod streams, whose previous job was applied by then.
Stream 0 is the worker's model (evaluated; checkpointed as the model); the others live in the
worker half's state. Every scheme with the same `streams` trains the same models on the same
data, so they all end with the same parameters.

`flush(workers)` decodes every job still in flight (one round that waits for all); call it after
the last step. Checkpoints need no flush: the driver state holds in-flight jobs and vectors.
`stragglers` (a StragglerModel, seeded by `seed`) holds worker r back in round k by a real,
cancellable sleep before it computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import ray
import torch

from raylane.comm.compression_config import CompressionConfig
from raylane.strategies.base import DriverStrategy, WorkerCalls, WorkerContext, WorkerStrategy, register
from raylane.strategies.gradient_coding.codes import KINDS, make_code
from raylane.strategies.gradient_coding.draco import check_vote, vote
from raylane.strategies.gradient_coding.patience import RULES, Patience
from raylane.strategies.ddp import clip_and_step
from raylane.strategies.gradient_coding.sgc import (BurstyModel, GCSchedule, MSGCSchedule, Part, Schedule, SRSGCSchedule, Task,
                                    sr_sgc_s)
from raylane.validation import check, one_of
from raylane.stragglers import StragglerModel

log = logging.getLogger(__name__)

SCHEMES = ("uncoded", "gc", "sr_sgc", "m_sgc")
WIRE_DTYPES = {"float64": np.float64, "float32": np.float32}


@dataclass
class GradientCodingConfig:
    name: str = "gradient_coding"
    scheme: str = "gc"              # uncoded | gc | sr_sgc | m_sgc
    s: int = 1                      # gc: stragglers tolerated per round
    code: str = "auto"              # auto | frc | crc: gc's code, sr_sgc's code, m_sgc's D2 code
    burst: int = 1                  # B (sr_sgc, m_sgc): longest straggling burst of a worker
    window: int = 2                 # W: the window of the straggler model
    lam: int = 1                    # lambda: distinct stragglers per window
    streams: int = 0                # models trained round-robin; 0: the fewest possible (T + 1)
    mu: float = 0.5                 # sgc patience, see straggler_rule
    straggler_rule: str = "silence"  # silence: none answered for mu x the first's time | fastest: not
                                    # answered by (1 + mu) x the first's time (the SGC authors' rule)
    wire_dtype: str = "float64"     # coded messages: float64 (exact decoding) | float32
    timeout_s: float = 300.0        # the longest a round waits for a decodable set of answers
    seed: int = 0                   # CRC coefficients and the straggler pattern
    stragglers: StragglerModel | None = None   # injected delays (null: none)
    compression: CompressionConfig = field(default_factory=CompressionConfig)  # of decoded updates
    vote_f: int = 0                 # DRACO (gc + frc): Byzantine workers each group's majority vote outvotes

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.scheme", self.scheme, SCHEMES)
        one_of(f"{prefix}.code", self.code, KINDS)
        one_of(f"{prefix}.wire_dtype", self.wire_dtype, list(WIRE_DTYPES))
        one_of(f"{prefix}.straggler_rule", self.straggler_rule, RULES)
        check(self.s >= 0, f"{prefix}.s", self.s, "must be >= 0")
        check(self.burst >= 1, f"{prefix}.burst", self.burst, "must be >= 1")
        check(self.window > self.burst, f"{prefix}.window", self.window, f"must be > {prefix}.burst={self.burst}")
        check(self.lam >= 1, f"{prefix}.lam", self.lam, "must be >= 1")
        check(self.mu >= 0, f"{prefix}.mu", self.mu, "must be >= 0")
        check(self.timeout_s > 0, f"{prefix}.timeout_s", self.timeout_s, "must be > 0")
        if self.scheme == "sr_sgc":
            check((self.window - 1) % self.burst == 0, f"{prefix}.window", self.window,
                  f"sr_sgc needs burst={self.burst} to divide window - 1")
        check(self.streams == 0 or self.streams > self.delay, f"{prefix}.streams", self.streams,
              f"must be 0 (auto) or > the delay T={self.delay} of scheme={self.scheme}")
        check(self.vote_f >= 0, f"{prefix}.vote_f", self.vote_f, "must be >= 0")
        check(self.vote_f == 0 or self.scheme == "gc", f"{prefix}.vote_f", self.vote_f,
              f"the majority vote (DRACO) needs scheme=gc, not scheme={self.scheme}")

    @property
    def delay(self) -> int:
        """T: job t is decoded by the end of round t + T."""
        return {"sr_sgc": self.burst, "m_sgc": self.window - 2 + self.burst}.get(self.scheme, 0)

    def num_streams(self) -> int:
        return self.streams or self.delay + 1

    def check_run(self, run: Any) -> None:
        """Checks against the whole run config (config validation: before Ray starts or a directory
        is touched)."""
        self.check_world_size(run.cluster.num_workers)

    def warn_run(self, run: Any) -> list[str]:
        """A coded scheme with nothing to straggle: every worker answers, the code's effect never shows."""
        planned = self.stragglers is not None or any(e.kind == "straggler" for e in run.faults.events)
        if self.scheme == "uncoded" or planned:
            return []
        return [f"strategy.scheme={self.scheme} with no straggler plan (strategy.stragglers null, no straggler in "
                f"faults): on one host no worker is slower, so the code tolerates nothing it would show; add "
                f"faults=stragglers_bursty or faults=stragglers_lambda"]

    def check_world_size(self, n: int, prefix: str = "strategy") -> None:
        """The checks that need the number of workers: no code can meet these settings."""
        s = {"gc": self.s, "sr_sgc": sr_sgc_s(self.burst, self.window, self.lam), "m_sgc": self.lam}.get(self.scheme, 0)
        key = {"gc": "s", "uncoded": "scheme"}.get(self.scheme, "lam")
        value = getattr(self, key)
        if self.scheme == "m_sgc":
            check(self.lam <= n, f"{prefix}.lam", self.lam, f"must be <= cluster.num_workers={n}")
        elif self.scheme != "uncoded":
            check(s < n, f"{prefix}.{key}", value, f"gives {s} stragglers per round; must be < cluster.num_workers={n}")
        if self.scheme == "sr_sgc":
            check(self.lam <= n, f"{prefix}.lam", self.lam, f"must be <= cluster.num_workers={n}")
        if self.code == "frc" and s < n:
            check(n % (s + 1) == 0, f"{prefix}.code", self.code,
                  f"frc needs (s+1)={s + 1} to divide cluster.num_workers={n}; use crc or auto")
        if self.vote_f:
            why = check_vote(n, self.s, self.vote_f, self.code)
            check(why is None, f"{prefix}.vote_f", self.vote_f, str(why))


def build_schedule(cfg: GradientCodingConfig, n: int) -> Schedule:
    eps = float(np.finfo(WIRE_DTYPES[cfg.wire_dtype]).eps)
    model = BurstyModel(cfg.burst, cfg.window, cfg.lam)
    if cfg.scheme in ("uncoded", "gc"):
        code = "frc" if cfg.vote_f else cfg.code  # DRACO votes over FRC groups
        return GCSchedule(make_code(n, cfg.s if cfg.scheme == "gc" else 0, code, cfg.seed, eps))
    if cfg.scheme == "sr_sgc":
        return SRSGCSchedule(make_code(n, sr_sgc_s(cfg.burst, cfg.window, cfg.lam), cfg.code, cfg.seed, eps), model)
    return MSGCSchedule(n, model, make_code(n, cfg.lam, cfg.code, cfg.seed, eps) if cfg.lam < n else None)


# -- worker half ---------------------------------------------------------------------------
def _cancelled() -> bool:
    """Whether the driver cancelled the Ray task running this call (False outside Ray)."""
    if not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().is_canceled()
    except (RuntimeError, AttributeError):
        return False


def _sleep(seconds: float) -> bool:
    """Sleep (an injected straggler delay) unless cancelled first; True if it was cancelled."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if _cancelled():
            return True
        time.sleep(min(0.005, max(0.0, end - time.monotonic())))
    return _cancelled()


@dataclass
class _Stream:
    tensors: list[torch.Tensor]
    optimizer: torch.optim.Optimizer


class CodedWorker(WorkerStrategy):
    replicas_identical = True
    update_methods = ("gc_apply",)

    def __init__(self, cfg: GradientCodingConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.fetch, self.batch_size = ctx.samples, ctx.batch_size
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        self.streams = [_Stream([p.detach().clone() for p in self.params], self._new_optimizer())
                        for _ in range(cfg.num_streams() - 1)]
        self.decompressor = cfg.compression.build(prefix="strategy.compression")

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """An optimizer like the worker's (same groups and settings), with its own state."""
        opt = self.ctx.optimizer
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
                  for g in opt.param_groups]
        return type(opt)(groups)

    @contextlib.contextmanager
    def stream(self, m: int) -> Iterator[WorkerContext]:
        """The model holds stream m's parameters for the duration; yields its context."""
        if m == 0:
            yield self.ctx
            return
        own = [p.data for p in self.params]
        for p, t in zip(self.params, self.streams[m - 1].tensors):
            p.data = t
        try:
            yield dataclasses.replace(self.ctx, optimizer=self.streams[m - 1].optimizer)
        finally:
            for p, t in zip(self.params, own):
                p.data = t

    # -- called by the driver ---------------------------------------------------------------
    def gc_compute(self, work: list[tuple[int, int, list[Part]]], atoms: int, delay_s: float = 0.0) -> dict | None:
        """Each (stream, sample offset, parts) of `work` -> one coded vector; None if cancelled."""
        if delay_s > 0 and _sleep(delay_s):
            return None
        t0, stats = time.perf_counter(), {"samples": 0, "tokens": 0, "loss_sum": 0.0}
        vectors = []
        for stream, offset, parts in work:
            if _cancelled():
                return None
            vectors.append(self._coded(stream, offset, parts, atoms, stats))
        dtype = WIRE_DTYPES[self.cfg.wire_dtype]
        vectors = [v.astype(dtype, copy=False) for v in vectors]
        corrupt = self.ctx.comm.outgoing if self.ctx.comm is not None else None
        if corrupt is not None:  # a Byzantine worker this step (a wire mode): what it sends is forged
            vectors = [corrupt(torch.from_numpy(v.copy())).numpy() for v in vectors]
        return {"vectors": vectors, "compute_s": time.perf_counter() - t0, "global_samples": self._global(),
                "bytes": sum(v.nbytes for v in vectors), **stats}

    def _global(self) -> int:
        return self.ctx.world_size * self.batch_size

    def _coded(self, stream: int, offset: int, parts: list[Part], atoms: int, stats: dict) -> np.ndarray:
        g = self._global()
        out = None
        with self.stream(stream) as ctx:
            for first, count, coeff in parts:
                lo, hi = first * g // atoms, (first + count) * g // atoms
                if hi == lo:
                    continue
                vec, loss, tokens = self._partition_gradient(ctx, offset + lo, hi - lo)
                weight = coeff * (hi - lo) / g
                out = vec * weight if out is None else out + vec * weight
                stats["samples"] += hi - lo
                stats["tokens"] += tokens
                stats["loss_sum"] += loss * (hi - lo)
        return out if out is not None else np.zeros(sum(p.numel() for p in self.params) + 1)

    def _partition_gradient(self, ctx: WorkerContext, start: int, count: int) -> tuple[np.ndarray, float, int]:
        """[grad of the mean loss over samples [start, start+count) ; that loss], in float64."""
        batch = self.fetch(start, count)
        ctx.model.train()
        ctx.optimizer.zero_grad(set_to_none=False)
        with self._seeded(self.ctx.seed * 1_000_003 + start):  # dropout masks: the same on any worker
            loss = ctx.loss(batch)
            loss.backward()
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in self.params]
        flat = torch.cat([*grads, loss.detach().reshape(1)]).to(torch.float64).cpu().numpy()
        return flat, float(loss.item()), int(batch[1].numel())

    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Random numbers drawn inside come from `seed`; the worker's own streams are restored after."""
        device = next(iter(self.params)).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if devices:
                torch.cuda.manual_seed(seed)
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it formats a stack per call
            yield

    def gc_apply(self, stream: int, payload: Any, lr: float) -> dict[str, float]:
        """Write the decoded full gradient of a job into stream `stream`'s .grad, clip, step."""
        flat = self.decompressor.decompress(payload).float().cpu()
        with self.stream(stream) as ctx:
            offset = 0
            for p in self.params:
                n = p.numel()
                grad = flat[offset:offset + n].view_as(p).to(p.device)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
                offset += n
            return {"grad_norm": clip_and_step(ctx, lr)}

    def state_dict(self) -> dict[str, Any]:
        return {"streams": [{"tensors": [t.clone() for t in s.tensors], "optimizer": s.optimizer.state_dict()}
                            for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, saved in zip(self.streams, state.get("streams", [])):
            for t, v in zip(s.tensors, saved["tensors"]):
                t.copy_(v)
            s.optimizer.load_state_dict(saved["optimizer"])


# -- driver half ---------------------------------------------------------------------------
@dataclass
class _Job:
    stream: int
    offset: int
    lr: float


@dataclass
class _Round:
    """What one round saw: answers {rank: (seconds after the round began, result)}."""

    answers: dict[int, tuple[float, dict]]
    stragglers: frozenset[int]
    violation: bool
    first_s: float
    vote: Any = None  # DRACO (vote_f): every group's winning copy among the answers


class RoundTimeout(TimeoutError):
    """A round found no set of answers it could end with within strategy.timeout_s."""


TOTALS = ("rounds", "flush_rounds", "round_s", "wait_s", "violations", "stragglers", "decoded",
          "bytes_sent", "bytes_recv", "samples_computed", "compute_s")


class CodedDriver(DriverStrategy):
    def __init__(self, cfg: GradientCodingConfig, world_size: int):
        super().__init__(cfg, world_size)
        cfg.check_world_size(world_size)
        self.schedule = build_schedule(cfg, world_size)
        self.num_streams = cfg.num_streams()
        self.compressor = cfg.compression.build(prefix="strategy.compression")
        self.jobs: dict[int, _Job] = {}
        self.results: dict[tuple[int, Task], np.ndarray] = {}
        self.issued = 0
        self.last_loss: float | None = None
        self.totals: dict[str, float] = dict.fromkeys(TOTALS, 0)
        self._applies: list = []
        self.disagreeing: list[int] = []  # DRACO: the last decoded job's outvoted workers

    def run_round(self, workers: WorkerCalls, step: int, sample_offset: int, lr: float) -> list[dict]:
        if workers.world_size != self.world_size:
            raise RuntimeError(f"gradient_coding: its code is for {self.world_size} workers but the group has "
                               f"{workers.world_size}; changing membership mid-run is not supported")
        tasks = self.schedule.begin(new_job=True)
        self.jobs[self.schedule.round] = _Job(self.issued % self.num_streams, sample_offset, lr)
        self.issued += 1
        return self._play(workers, tasks)

    def finish(self, workers: WorkerCalls) -> None:
        """The coordinator's end-of-run hook: apply the jobs still in flight."""
        self.flush(workers)

    def flush(self, workers: WorkerCalls) -> int:
        """Decode every job in flight (a round that waits for all) and wait until all applied it."""
        rounds = 0
        if self.schedule.pending():
            self._play(workers, self.schedule.begin_flush())
            rounds = 1
        assert not self.schedule.pending(), f"jobs {self.schedule.pending()} survived a flush"
        self._settle(workers, wait=True)
        return rounds

    # -- one round ------------------------------------------------------------------------
    def _play(self, workers: WorkerCalls, tasks: dict[int, list[Task]]) -> list[dict]:
        t0 = time.perf_counter()
        refs = self._issue(workers, tasks)
        rnd = self._collect(workers, refs, t0)
        for ref, rank in refs.items():
            if rank in rnd.stragglers:
                ray.cancel(ref)  # the schemes never use a late result; free the worker
        for rank, (_, result) in rnd.answers.items():
            self.results.update({(rank, task): v for task, v in zip(tasks[rank], result["vectors"])})
        ready = self.schedule.end(rnd.stragglers)
        overdue = [t for t in self.schedule.pending() if t + self.schedule.T <= self.schedule.round]
        assert not overdue, f"jobs {overdue} missed their deadline under an accepted straggler pattern"
        decoded = [self._decode(workers, job, rnd.vote) for job in ready]
        self._settle(workers, wait=False)
        return self._metrics(rnd, decoded, time.perf_counter() - t0)

    def _issue(self, workers: WorkerCalls, tasks: dict[int, list[Task]]) -> dict[Any, int]:
        refs = {}
        for rank, mine in tasks.items():
            if not mine:
                continue
            work = [(self.jobs[t.job].stream, self.jobs[t.job].offset, self.schedule.parts(rank, t)) for t in mine]
            (ref,) = workers.call("gc_compute", work, self.schedule.atoms, self._delay(rank), ranks=[rank])
            refs[ref] = rank
        return refs

    def _delay(self, rank: int) -> float:
        model = self.cfg.stragglers
        return model.delay(self.cfg.seed, rank, self.schedule.round, self.schedule.load) if model is not None else 0.0

    def _collect(self, workers: WorkerCalls, refs: dict[Any, int], t0: float) -> _Round:
        """Wait until the unanswered workers may be declared stragglers (strategies/gradient_coding/patience.py's rule)."""
        pending, answers = dict(refs), {}
        patience, violation, won = Patience(self.cfg.straggler_rule, self.cfg.mu), False, None
        deadline = t0 + self.cfg.timeout_s
        while pending:
            now = time.perf_counter()
            if answers:
                patient = patience.out(now - t0)
                if self.cfg.vote_f:  # DRACO: every group's vote decided (stragglers skipped only then)
                    won = self._vote(answers)
                    if won is not None:
                        break
                elif (self.schedule.eager or patient) and self.schedule.acceptable(pending.values()):
                    break
                violation |= patient and not self.schedule.flushing
            if now >= deadline:
                raise RoundTimeout(f"strategy.timeout_s={self.cfg.timeout_s}: round {self.schedule.round} "
                                   f"({self.schedule.name}) cannot end without workers {sorted(pending.values())}")
            wake = min(t0 + patience.until, deadline) if not patience.out(now - t0) else deadline
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wake - now))
            for ref in ready:
                rank = pending.pop(ref)
                (result,) = workers.get([ref])
                answers[rank] = (time.perf_counter() - t0, result)
                patience.answered(answers[rank][0])
        if violation:  # counted in gc/violation and the summary; a line per round is noise on a busy host
            log.debug("round %d (%s): the silent workers could not be declared stragglers; waited for some of "
                     "them (violation)", self.schedule.round, self.schedule.name)
        if self.cfg.vote_f and won is None:  # the last answer ended the wait before a vote was taken
            won = self._vote(answers)
        return _Round(answers, frozenset(pending.values()), violation, patience.first or 0.0, won)

    def _vote(self, answers: dict[int, tuple[float, dict]]) -> Any:
        """DRACO's vote over this round's answers (gc: one row per worker), or None while undecided."""
        copies = {rank: res["vectors"][0] for rank, (_, res) in answers.items() if res and res["vectors"]}
        return vote(copies, self.world_size, self.cfg.s, self.cfg.vote_f)

    def _decode(self, workers: WorkerCalls, job: int, won: Any = None) -> tuple[float, int]:
        """Decode `job` in float64, send its update to every worker; (its loss, bytes each receives).
        Jobs are decoded in order, so `last_loss` ends as the newest job's. With vote_f: each FRC group's
        majority copy (DRACO: `won`, the vote of the round that computed the job, which gc decodes at
        once); the workers that disagreed are named in the round's metrics."""
        plan = self.schedule.decoding(job)
        if self.cfg.vote_f:
            assert won is not None, f"job {job}: the vote ended undecided"
            plan = [(rank, Task(job, "row"), 1.0) for rank in won.winners.values()]
            self.disagreeing = won.disagreeing
        total = None
        for rank, task, coeff in plan:
            part = coeff * self.results[(rank, task)].astype(np.float64)
            total = part if total is None else total + part
        self.schedule.forget(job)
        self.results = {k: v for k, v in self.results.items() if k[1].job != job}
        info = self.jobs.pop(job)
        payload = self.compressor.compress(torch.from_numpy(total[:-1].astype(np.float32)), key=f"stream{info.stream}")
        self._applies += workers.call("gc_apply", info.stream, ray.put(payload), info.lr)
        self.last_loss = float(total[-1])
        return self.last_loss, payload.nbytes

    def _settle(self, workers: WorkerCalls, wait: bool) -> None:
        """Surface errors of finished `gc_apply` calls; with `wait`, wait (bounded) for all of them."""
        if not self._applies:
            return
        ready, rest = ray.wait(self._applies, num_returns=len(self._applies),
                               timeout=self.cfg.timeout_s if wait else 0)
        workers.get(ready)
        self._applies = rest
        if wait and rest:
            raise RoundTimeout(f"strategy.timeout_s={self.cfg.timeout_s}: updates not applied in time")

    # -- metrics and state ----------------------------------------------------------------
    def _metrics(self, rnd: _Round, decoded: list[tuple[float, int]], round_s: float) -> list[dict]:
        answers = [res for _, res in rnd.answers.values()]
        samples = sum(r["samples"] for r in answers)
        # the newest decoded job's loss; before the first decode, the raw loss of what was computed
        loss = self.last_loss if self.last_loss is not None else \
            sum(r["loss_sum"] for r in answers) / max(1, samples)
        per_sample = sum(r["tokens"] for r in answers) / max(1, samples)
        g = answers[0]["global_samples"] if answers else 0
        useful = 0 if self.schedule.flushing else per_sample * g / self.world_size
        recv = sum(nbytes for _, nbytes in decoded)
        common = {"gc/round_s": round_s, "gc/wait_s": max(0.0, round_s - rnd.first_s),
                  "gc/stragglers": len(rnd.stragglers), "gc/violation": int(rnd.violation),
                  "gc/load": self.schedule.load, "gc/decoded": len(decoded)}
        if self.cfg.vote_f:
            common["gc/disagreeing"] = len(self.disagreeing)
            common.update({f"gc/disagree/rank{r}": float(r in self.disagreeing) for r in range(self.world_size)})
        self._account(common, sum(r["bytes"] for r in answers), recv * self.world_size, samples,
                      sum(r["compute_s"] for r in answers))
        out = []
        for rank in range(self.world_size):
            t, res = rnd.answers.get(rank, (round_s, None))
            out.append({"rank": rank, "loss": loss, "bytes_sent": res["bytes"] if res else 0, "bytes_recv": recv,
                        "tokens": useful, "samples": res["samples"] if res else 0, "step_time_s": t,
                        "compute_s": res["compute_s"] if res else 0.0,
                        "gc/computed_load": (res["samples"] / g) if res and g else 0.0, **common})
        return out

    def _account(self, common: dict, sent: int, recv: int, samples: int, compute_s: float) -> None:
        t = self.totals
        t["flush_rounds" if self.schedule.flushing else "rounds"] += 1
        t["round_s"] += common["gc/round_s"]
        t["wait_s"] += common["gc/wait_s"]
        t["violations"] += common["gc/violation"]
        t["stragglers"] += common["gc/stragglers"]
        t["decoded"] += common["gc/decoded"]
        t["bytes_sent"] += sent
        t["bytes_recv"] += recv
        t["samples_computed"] += samples
        t["compute_s"] += compute_s

    def state_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {"round": s.round, "issued": sorted(s.issued), "decoded": sorted(s.decoded),
                "received": sorted((i, t.job, t.kind, t.index) for i, t in s.received),
                "history": [sorted(h) for h in s.history], "exempt": list(s.exempt),
                "results": {(i, t.job, t.kind, t.index): torch.from_numpy(np.array(v))  # weights_only-loadable
                            for (i, t), v in self.results.items()},
                "jobs": {j: dataclasses.astuple(info) for j, info in self.jobs.items()},
                "issued_jobs": self.issued, "last_loss": self.last_loss, "totals": dict(self.totals),
                "compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.schedule
        s.round, s.issued, s.decoded = state["round"], set(state["issued"]), set(state["decoded"])
        s.received = {(i, Task(job, kind, index)) for i, job, kind, index in state["received"]}
        s.history = [frozenset(h) for h in state["history"]]
        s.exempt = list(state.get("exempt", [False] * len(s.history)))
        self.results = {(i, Task(job, kind, index)): v.numpy() for (i, job, kind, index), v in state["results"].items()}
        self.jobs = {j: _Job(*info) for j, info in state["jobs"].items()}
        self.issued, self.last_loss = state["issued_jobs"], state["last_loss"]
        self.totals.update(state["totals"])
        self.compressor.load_state_dict(state["compressor"])


register("gradient_coding", GradientCodingConfig, CodedWorker, CodedDriver)
