"""Coordinator: owns one run — workers, rounds, evaluation, checkpoints, metrics.

Call order: `Coordinator(cfg)` → `train()` (optionally `train(until_step=k)` to stop
early, e.g. to rehearse a resume) → `close()`. `run(cfg)` does all three.
With `resume=true` it continues from the newest valid checkpoint in `run.dir`.
It never names a strategy, model or compressor: the strategy comes from the registry.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import yaml

from raylane import strategies
from raylane.orchestrator import checkpoint
from raylane.orchestrator.metrics import MetricsSink
from raylane.orchestrator.summary import Summary
from raylane.orchestrator.worker_group import WorkerGroup
from raylane.workers.optim import lr_at

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, cfg: Any, loopback: bool = True):
        self.cfg = cfg
        self.run_dir: Path = cfg.run.path()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.spec = strategies.get(cfg.strategy.name)
        self.driver = self.spec.driver_cls(cfg.strategy, cfg.cluster.num_workers)
        self.group = WorkerGroup(cfg, loopback)
        self.step, self.samples = 0, 0
        self.summary = Summary()
        self.group.start()
        if cfg.resume:
            self._restore()
        self.metrics = MetricsSink(self.run_dir, cfg.logging, cfg.train.steps, self.step, self._run_id(),
                                   cfg.run.name, cfg.to_dict())
        if cfg.resume:
            self.metrics.event(self.step, "resumed", from_step=self.step)

    def _run_id(self) -> str:
        """Stable across resumes: kept in <run.dir>/run_id."""
        path = self.run_dir / "run_id"
        if not path.exists():
            path.write_text(uuid.uuid4().hex[:12])
        return path.read_text().strip()

    # -- training ---------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.group.world_size * self.cfg.data.batch_size

    def train(self, until_step: int | None = None) -> Summary:
        cfg = self.cfg
        last = min(cfg.train.steps, until_step or cfg.train.steps)
        t_start = time.perf_counter()
        while self.step < last:
            step = self.step + 1
            lr = lr_at(step, cfg.train.steps, cfg.optim)
            t0 = time.perf_counter()
            results = self.driver.run_round(self.group, step, self.samples, lr)
            self.step, self.samples = step, self.samples + self.global_batch
            self._log_step(step, results, time.perf_counter() - t0, lr)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                self.evaluate()
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
        if self.step == cfg.train.steps:
            if self.summary.eval_loss is None or self.summary.eval_step != self.step:
                self.evaluate()
            if not cfg.checkpoint.every or self.step % cfg.checkpoint.every:
                self.save_checkpoint()
        self.summary.wall_s += time.perf_counter() - t_start
        return self.summary

    def _log_step(self, step: int, results: list[dict], round_s: float, lr: float) -> None:
        n = len(results)
        loss = sum(r["loss"] for r in results) / n
        sent = sum(r["bytes_sent"] for r in results)
        recv = sum(r["bytes_recv"] for r in results)
        tokens = sum(r["tokens"] for r in results)
        metrics = {"train/loss": loss, "train/lr": lr, "train/round_s": round_s,
                   "train/tokens_per_s": tokens / round_s,
                   "train/step_time_s": max(r["step_time_s"] for r in results),
                   "comm/bytes_sent": sent, "comm/bytes_recv": recv,
                   "comm/bytes_sent_per_worker": sent / n,
                   "comm/wait_s": max(r.get("comm_wait_s", 0.0) for r in results),
                   **{f"comm/bytes_sent/rank{r['rank']}": r["bytes_sent"] for r in results}}
        self.summary.record_step(step, loss, sent, tokens)
        metrics["comm/bytes_total"] = self.summary.bytes_sent_total
        self.metrics.log(step, metrics, advance=1)

    def evaluate(self) -> float:
        parts = self.group.get(self.group.call("evaluate", self.group.world_size))
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        loss = total / max(1, count)
        self.summary.record_eval(self.step, loss)
        self.metrics.log(self.step, {"eval/loss": loss})
        return loss

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        identical = self.spec.worker_cls.replicas_identical
        states = self.group.get([a.state_dict.remote(replica=(r == 0 or not identical))
                                 for r, a in enumerate(self.group.actors)])
        parts: dict[str, Any] = {"driver": {"strategy": self.driver.state_dict(), "step": self.step,
                                            "samples": self.samples, "summary": self.summary.state_dict()}}
        for r, s in enumerate(states):
            if s["replica"] is not None:
                parts["replica" if identical else f"replica_{r}"] = s["replica"]
            parts[f"local_{r}"] = s["local"]
        meta = {"config": self.cfg.to_dict(), "world_size": self.group.world_size,
                "replicas_identical": identical}
        path = checkpoint.save(self.run_dir / "checkpoints", self.step, parts, meta, self.cfg.checkpoint.keep)
        self.metrics.event(self.step, "checkpoint", path=str(path))
        return path

    def _restore(self) -> None:
        found = checkpoint.latest(self.run_dir / "checkpoints")
        if found is None:
            log.warning("resume=true but %s has no valid checkpoint: starting from step 0", self.run_dir)
            return
        path, meta = found
        driver = checkpoint.load_part(path, "driver")
        self.driver.load_state_dict(driver["strategy"])
        self.step, self.samples = driver["step"], driver["samples"]
        self.summary.load_state_dict(driver["summary"])
        shared = ray.put(checkpoint.load_part(path, "replica")) if meta["replicas_identical"] else None
        refs = []
        for r, actor in enumerate(self.group.actors):
            replica = shared if shared is not None else checkpoint.load_part(path, f"replica_{r}")
            local = checkpoint.load_part(path, f"local_{r}") if f"local_{r}.pt" in meta["files"] else None
            refs.append(actor.load_state_dict.remote(replica, local))
        self.group.get(refs)
        log.info("resumed from %s at step %d", path, self.step)

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        self.group.shutdown()


def run(cfg: Any, loopback: bool = True) -> Summary:
    coord = Coordinator(cfg, loopback)
    try:
        return coord.train()
    finally:
        coord.close()
