"""Coordinator: owns one run — workers, rounds, evaluation, checkpoints, faults, metrics.

Call order: `Coordinator(cfg)` → `train()` (optionally `train(until_step=k)` to stop
early) → `close()`. `run(cfg)` does all three. With `resume=true` it continues from
the newest valid checkpoint in `run.dir`.

A round that fails (a worker died, hung, or its collective broke) is recovered in place
(`recovery.py`), then the step is run again: every step is applied exactly once. When recovery
brought every rank to the failed step itself (the ranks that completed it seeded the others, e.g.
a lost replica from a live peer replica), the step stands and is logged from those ranks' results.
It never names a strategy, model or compressor: the strategy comes from the registry.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import ray
import yaml

from raylane import strategies
from raylane.orchestrator import checkpoint, contract, straggler_stats
from raylane.orchestrator.faults import FaultPlan
from raylane.orchestrator.metrics import MetricsSink, read_records
from raylane.orchestrator.outliers import OutlierDetector
from raylane.orchestrator.recovery import Recovery
from raylane.orchestrator.rundir import prepare_run_dir
from raylane.orchestrator.summary import Summary, fault_section
from raylane.orchestrator.worker_group import WorkerFailure, WorkerGroup
from raylane.strategies.base import Layout
from raylane.workers.optim import lr_at

log = logging.getLogger(__name__)

DRIVER_CRASH_EXIT = 3


class RunFailed(RuntimeError):
    """The same step failed `cluster.max_step_failures` times in a row: a fault that recovery
    cannot fix (a bug, an impossible setting), reported instead of retried forever."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: where the run stopped and where the same command will continue from."""

    def __init__(self, step: int, checkpoint_step: int | None):
        super().__init__(step, checkpoint_step)
        self.step, self.checkpoint_step = step, checkpoint_step

    def __str__(self) -> str:
        if self.checkpoint_step is None:
            return f"stopped at step {self.step}; no checkpoint yet, so the same command starts over"
        return (f"stopped at step {self.step}; run the same command to continue from the checkpoint at step "
                f"{self.checkpoint_step}")


class Coordinator:
    def __init__(self, cfg: Any, loopback: bool = True,
                 fault_hook: Callable[[Any, set[int], str], None] | None = None):
        """`fault_hook(event, ranks, node_id)` runs after a driver-side fault killed `ranks`
        (tests use it to remove a Ray node, or take away the capacity a replacement needs)."""
        self.cfg = cfg
        self.run_dir: Path = prepare_run_dir(cfg)  # checks again, resolves resume=auto, creates the dir
        if not cfg.resume:  # a resumed run's config.yaml is replaced only once its checkpoint has loaded
            self._write_config()
        self.spec = strategies.get(cfg.strategy.name)
        self.driver = self.spec.driver_cls(cfg.strategy, cfg.cluster.num_workers)
        self.plan = FaultPlan(cfg.faults, cfg.seed, self.run_dir / "faults_fired.json")
        self.fault_hook = fault_hook
        self.group = WorkerGroup(cfg, loopback)
        self.group.links = self.plan.links(cfg.cluster.num_workers)
        self.step, self.samples = 0, 0
        self._failures: dict[int, int] = {}  # step -> failures in a row
        self.checkpoint_step: int | None = None
        self._byzantine: set[int] = set()
        self._delays: dict[int, float] = {}  # this step's straggler delays, by rank
        self._straggling = False  # the plan's first delay was announced
        self.samples_at: dict[int, int] = {0: 0}
        self.summary = Summary(unit="tokens" if cfg.data.name == "chars" else "samples")
        self.outliers = OutlierDetector(cfg.faults.outlier_window, cfg.faults.outlier_factor,
                                        cfg.faults.outlier_min_s)
        self.group.launch()  # the workers start while a fresh run opens its metrics (W&B: seconds)
        metrics = None
        try:
            metrics = None if cfg.resume else self._open_metrics()
            self.group.wait_started()
        except BaseException:
            if metrics is not None:
                metrics.close()
            self.group.shutdown()
            raise
        if cfg.resume:
            try:
                self.restore_checkpoint()
            except BaseException:  # e.g. a checkpoint this strategy cannot load: stop the workers, keep config.yaml
                self.group.shutdown()
                raise
            self._write_config()
        self.metrics = metrics or self._open_metrics()  # a resumed run's opens at its checkpoint's step
        self.metrics.start_clock()
        self.group.on_wait = self.metrics.status
        self.recovery = Recovery(self)
        if cfg.resume:
            self.metrics.event(self.step, "resumed", from_step=self.step, steps_redone=self.metrics.superseded)

    def _open_metrics(self) -> MetricsSink:
        cfg = self.cfg
        return MetricsSink(self.run_dir, cfg.logging, cfg.train.steps, self.step, self._run_id(), cfg.run.name,
                           cfg.to_dict(), resume=bool(cfg.resume))

    def _write_config(self) -> None:
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _run_id(self) -> str:
        """Stable across resumes: kept in <run.dir>/run_id."""
        path = self.run_dir / "run_id"
        if not path.exists():
            import uuid

            path.write_text(uuid.uuid4().hex[:12])
        return path.read_text().strip()

    # -- training ---------------------------------------------------------------------
    def layout(self) -> Layout:
        """What each rank of the current world holds (the strategy's layout)."""
        return self.spec.worker_cls.layout(self.cfg.strategy, self.group.world_size)

    @property
    def global_batch(self) -> int:
        return self.group.world_size * self.cfg.data.batch_size

    def train(self, until_step: int | None = None) -> Summary:
        cfg = self.cfg
        last = min(cfg.train.steps, until_step or cfg.train.steps)
        if self.checkpoint_step is None and cfg.checkpoint.every and not self._peers_cover_a_loss():
            self.save_checkpoint()  # a fault before the first checkpoint needs a state to go back to
        while self.step < last:
            step = self.step + 1
            self._driver_faults(step)
            self.recovery.maybe_grow(step)
            lr = lr_at(step, cfg.train.steps, cfg.optim)
            directives = self.plan.directives(step, self.group.world_size)
            self._announce(step, directives)
            self.group.begin_step(step, directives)
            t0 = time.perf_counter()
            self.samples_at[step] = self.samples + self.global_batch
            self.samples_at.pop(step - 10_000, None)
            try:
                results = self.driver.run_round(self.group, step, self.samples, lr)
                self.step, self.samples = step, self.samples_at[step]
            except WorkerFailure as failure:
                self._count_failure(step, failure)
                self.recovery.recover(failure, step, time.perf_counter() - t0)
                if self.step < step:  # rolled back: the step runs again
                    continue
                # the step stands (the ranks that completed it seeded the others): log what they returned
                results = [failure.results[r] for r in sorted(failure.results)]
            if results and all("loss" in r for r in results):  # (a driver-decided round returns other things)
                self._log_step(step, results, time.perf_counter() - t0, lr)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                self.evaluate()
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != cfg.train.steps:
                self.save_checkpoint()  # the last step's is saved by _finish, after the driver's finish
        if self.step == cfg.train.steps:
            self._finish()
        self.summary.wall_s = self.metrics.elapsed_s()
        return self.summary

    def _peers_cover_a_loss(self) -> bool:
        """Whether any one lost rank can be recovered from a live peer (every state key has two
        holders and a failed step leaves state intact); else recovery needs a checkpoint."""
        return self.spec.worker_cls.failed_step_keeps_state and \
            all(len(ranks) >= 2 for ranks in self.layout().holders().values())

    def _count_failure(self, step: int, failure: WorkerFailure) -> None:
        """Raise RunFailed when `step` has now failed `cluster.max_step_failures` times in a row."""
        count = self._failures.get(step, 0) + 1
        self._failures = {step: count}  # only the step failing now is counted
        if count >= self.cfg.cluster.max_step_failures:
            why = "; ".join(f"worker {r}: {e}" for r, e in sorted(failure.errors.items())) or str(failure)
            self.metrics.event(step, "run_failed", failures=count, error=why)
            raise RunFailed(f"step {step} failed {count} times in a row (cluster.max_step_failures="
                            f"{self.cfg.cluster.max_step_failures}), so recovery cannot fix it: {why}")

    def _finish(self) -> None:
        self.group.begin_step(self.step, {})
        self.driver.finish(self.group)
        if self.summary.eval_step != self.step:
            self.evaluate()
        self.save_checkpoint()  # holds what finish applied (gc's jobs in flight, diloco's syncs in flight)
        self.summary.wall_s = self.metrics.elapsed_s()
        self.summary.faults = fault_section([r for r in read_records(self.metrics.path) if "event" in r])
        (self.run_dir / "summary.yaml").write_text(yaml.safe_dump(self.summary.as_dict(), sort_keys=False))

    def _driver_faults(self, step: int) -> None:
        for event in self.plan.driver_events(step):
            self.metrics.event(step, "fault_injected", kind=event.kind, rank=event.rank)
            where = "" if event.rank is None else f" on worker {event.rank}"
            log.warning("fault injected: %s%s at step %d", event.kind, where, step)
            if event.kind == "driver_crash":
                log.error("fault plan: the driver crashes at step %d; run the same command again to resume", step)
                self.metrics.close()
                ray.shutdown()
                os._exit(DRIVER_CRASH_EXIT)
            node = self.group.addresses[event.rank]["node_id"]
            ranks = {event.rank}
            if event.kind == "node_loss":
                ranks = {r for r, a in enumerate(self.group.addresses) if a["node_id"] == node}
            self.group.kill(ranks)
            if self.fault_hook is not None:
                self.fault_hook(event, ranks, node)

    def _announce(self, step: int, directives: dict[int, Any]) -> None:
        """One line and one event per injected worker fault, before the peers' errors (delays are
        not announced: stragglers fire every step; byzantine once per rank until it stops)."""
        byzantine = set()
        for rank, d in sorted(directives.items()):
            kind = "crash" if d.crash else "hang" if d.hang_s else "byzantine" if d.byzantine else None
            if kind == "byzantine":
                byzantine.add(rank)
                if rank in self._byzantine:
                    continue
            if kind is not None:
                detail = {"crash": f" ({d.crash})", "hang": f" for {d.hang_s:g} s",
                          "byzantine": f" ({d.byzantine})"}[kind]
                self.metrics.event(step, "fault_injected", kind=kind, rank=rank)
                log.warning("fault injected: %s on worker %d at step %d%s", kind, rank, step, detail)
        self._byzantine = byzantine
        self._delays = straggler_stats.delays(directives)
        if self._delays and not self._straggling:
            self._straggling = True
            self.metrics.event(step, "fault_injected", kind="straggler", rank=None)
            log.warning("fault plan: stragglers from step %d (delays every step, counted in stragglers/ metrics)",
                        step)

    def _log_step(self, step: int, results: list[dict], round_s: float, lr: float) -> None:
        n = len(results)
        loss = sum(r["loss"] for r in results) / n
        sent = sum(r["bytes_sent"] for r in results)
        tokens = sum(r["tokens"] for r in results)
        self.summary.record_step(step, loss, sent, tokens)
        metrics = {"train/loss": loss, "train/lr": lr, "train/round_s": round_s,
                   "train/tokens_per_s": tokens / round_s,
                   "train/step_time_s": max(r["step_time_s"] for r in results),
                   "train/workers": n,
                   "comm/bytes_sent": sent, "comm/bytes_recv": sum(r["bytes_recv"] for r in results),
                   "comm/bytes_sent_per_worker": sent / n, "comm/bytes_total": self.summary.bytes_sent_total,
                   "comm/wait_s": max(r.get("comm_wait_s", 0.0) for r in results),
                   **{f"comm/bytes_sent/rank{r['rank']}": r["bytes_sent"] for r in results},
                   **{f"comm/{name}/bytes_sent": sum(r.get("group_bytes_sent", {}).get(name, 0) for r in results)
                      for name in sorted({n for r in results for n in r.get("group_bytes_sent", {})})},
                   **{k: v for r in results[:1] for k, v in r.items() if "/" in k}}
        if straggler_stats.has_plan(self.cfg.faults):
            metrics.update(straggler_stats.step_metrics(self._delays, metrics))
        self.summary.record_metrics(metrics)
        self.metrics.log(step, metrics, advance=1)
        if self.cfg.faults.detect_outliers:
            for rank, mine, peers in self.outliers.observe(results):
                self.metrics.event(step, "outlier", rank=rank, compute_s=mine, peers_s=peers)
                log.warning("worker %d is an outlier: %.3fs outside collectives vs %.3fs for its peers",
                            rank, mine, peers)
                if self.cfg.faults.isolate_outliers:
                    self.group.kill({rank})

    def evaluate(self) -> float:
        self.group.begin_step(self.step, {})
        parts = self.group.get(self.group.call("evaluate", self.group.world_size))
        views = self.spec.worker_cls.eval_views
        losses = {v: sum(p[v][0] for p in parts) / max(1, sum(p[v][1] for p in parts)) for v in views}
        label = getattr(self.cfg.strategy, "eval_label", None)  # e.g. DiLoCo: "global (outer) parameters, ..."
        self.summary.record_eval(self.step, losses[views[0]], label(self.step) if label else None)
        logged = {"eval/loss" if i == 0 else f"eval/loss_{v}": losses[v] for i, v in enumerate(views)}
        for i, view in enumerate(views):  # a classification dataset: eval/accuracy, eval/accuracy_<view>
            if f"{view}/accuracy" in parts[0]:
                hits = [p[f"{view}/accuracy"] for p in parts]
                logged["eval/accuracy" if i == 0 else f"eval/accuracy_{view}"] = \
                    sum(c for c, _ in hits) / max(1, sum(s for _, s in hits))
        self.summary.record_metrics(logged)
        self.metrics.log(self.step, logged)
        return losses[views[0]]

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """One part per state key of the layout (from the first rank that holds it), one `local_<r>`
        per rank, and the driver's state."""
        keys = self.layout().state_keys
        first = {key: ranks[0] for key, ranks in self.layout().holders().items()}
        self._check_identical()
        self.summary.wall_s = self.metrics.elapsed_s()
        states = ray.get([a.state_dict.remote(replica=(first[keys[r]] == r))
                          for r, a in enumerate(self.group.actors)], timeout=self.cfg.cluster.round_timeout_s)
        parts: dict[str, Any] = {"driver": {"strategy": self.driver.state_dict(), "step": self.step,
                                            "samples": self.samples, "summary": self.summary.state_dict()}}
        for r, s in enumerate(states):
            if s["replica"] is not None:
                parts[keys[r]] = s["replica"]
            parts[f"local_{r}"] = s["local"]
        meta = {"config": self.cfg.to_dict(), "world_size": self.group.world_size, "state_keys": list(keys)}
        path = checkpoint.save(self.run_dir / "checkpoints", self.step, parts, meta, self.cfg.checkpoint.keep)
        self.metrics.event(self.step, "checkpoint", path=str(path))
        self.checkpoint_step = self.step
        return path

    def _check_identical(self) -> None:
        """Ranks that share a state key hold the same parameters, or the run stops (contract.py). Not
        checked under a Byzantine plan: a forged message may legitimately leave the ranks apart."""
        if any(e.kind == "byzantine" for e in self.cfg.faults.events):
            return
        prints = ray.get([a.fingerprint.remote() for a in self.group.actors], timeout=self.cfg.cluster.round_timeout_s)
        problem = contract.identical_state_problem(self.layout(), prints, self.cfg.strategy.name)
        if problem is not None:
            self.metrics.event(self.step, "run_failed", error=problem)
            raise RunFailed(problem)

    def restore_checkpoint(self) -> bool:
        """Load the newest valid checkpoint into every worker; False when there is none."""
        found = checkpoint.latest(self.run_dir / "checkpoints")
        if found is None:
            log.warning("no valid checkpoint in %s: starting from step 0", self.run_dir)
            return False
        path, meta = found
        driver = checkpoint.load_part(path, "driver")
        self.driver.load_state_dict(driver["strategy"])
        self.step, self.samples = driver["step"], driver["samples"]
        self.samples_at[self.step] = self.samples
        self.summary.load_state_dict(driver["summary"])
        self.checkpoint_step = self.step
        if hasattr(self, "metrics"):  # back to a checkpoint mid-run: its later rows are superseded
            redone = self.metrics.rewind(self.step)
            self.metrics.event(self.step, "rewound", to_step=self.step, steps_redone=redone)
        saved = saved_state_keys(meta)
        loaded: dict[str, Any] = {}  # part name -> object ref, each part read once
        refs = []
        for r, (actor, key) in enumerate(zip(self.group.actors, self.layout().state_keys)):
            if f"{key}.pt" not in meta["files"]:  # a world of another size saved it: the nearest rank's
                key = saved[min(r, len(saved) - 1)]
            if key not in loaded:
                loaded[key] = ray.put(checkpoint.load_part(path, key))
            local = checkpoint.load_part(path, f"local_{r}") if f"local_{r}.pt" in meta["files"] else None
            refs.append(actor.load_state_dict.remote(loaded[key], local))
            refs.append(actor.set_step.remote(self.step))
        ray.get(refs, timeout=self.cfg.cluster.round_timeout_s)
        log.info("restored %s at step %d", path, self.step)
        return True

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "recovery"):
            self.recovery.abandon()
        self.group.shutdown()


def saved_state_keys(meta: dict[str, Any]) -> list[str]:
    """The state key of each rank that saved a checkpoint (older checkpoints: from the one bit)."""
    if "state_keys" in meta:
        return list(meta["state_keys"])
    n = meta["world_size"]
    return ["replica"] * n if meta["replicas_identical"] else [f"replica_{r}" for r in range(n)]


def run(cfg: Any, loopback: bool = True) -> Summary:
    coord = Coordinator(cfg, loopback)
    try:
        return coord.train()
    except KeyboardInterrupt:
        raise Interrupted(coord.step, coord.checkpoint_step) from None
    finally:
        coord.close()
