"""diloco: DiLoCo and Streaming DiLoCo (Douillard et al. 2023, 2025), strategy `diloco`.

Every worker is a replica training on its own data with the run's optimizer (the inner
optimizer; the papers use AdamW lr 4e-4, weight decay 0.1, betas 0.9/0.95: `optim.lr=4e-4
optim.weight_decay=0.1`). The model's blocks are split into `fragments` (P, see
diloco_fragments.py); fragment p's outer sync starts after inner step t when
(t - floor(p*H/P)) mod H == 0, H = `sync_every`: its outer gradient (global - local) is
all-reduced (mean) through `compression` (reduction in fp32, optional error feedback),
asynchronously, and merged `overlap_steps` (tau) inner steps later by the outer optimizer
(SGD, `outer_lr`, Nesterov `outer_momentum`) and local = alpha*local + (1-alpha)*global
(`merge_alpha`). Vanilla DiLoCo is fragments=1, overlap_steps=0, merge_alpha=0.

Call order per step: inner step → start the due fragment's sync → merge the syncs due.
After the last step the driver half (`DiLoCoDriver.finish`) has every worker merge the syncs
still in flight (`finish_syncs`: those started in the last tau steps), so the final evaluation
and checkpoint include every sync that was sent (merged up to tau steps early: the global
parameters are those the scheduled merge would give; the local ones skip the inner steps that
were never run).
Evaluation views: "global" (the outer parameters; `eval/loss`) and "replica_avg" (the mean of
the replicas' parameters: an exact all-gather that every rank joins, counted by the Communicator
under compressed_allgather.*, never in the diloco/ byte metrics).
Metrics (rank 0's are logged): diloco/fragment (started this step, -1: none), bytes_this_step,
bytes_total, peak_bytes_step (payload bytes this rank sent for outer syncs, from the
compressor's formula, which the Communicator's counters match), in_flight, drift (norm of
local - global before the sync), outer_grad_norm (of the merged mean outer gradient).
Outer state (global parameters, outer momentum, syncs in flight, error-feedback residuals,
step) is in `state_dict()`; replicas differ, so each rank's copy is checkpointed. Recovery
(`recover_from`): `checkpoint` (the default) rolls every replica back to the newest checkpoint and
replays, bit-exact; `peer_replica` restores only the lost replica, from a live peer (`peer_seeded`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from raylane.comm import CompressionConfig, Communicator
from raylane.strategies.base import DriverStrategy, Layout, WorkerCalls, WorkerContext, WorkerStrategy, register
from raylane.strategies.ddp import clip_and_step
from raylane.strategies.diloco_fragments import PATTERNS, SyncSchedule, split_parameters
from raylane.strategies.diloco_outer import OuterSync
from raylane.validation import ConfigError, check, one_of


@dataclass
class DiLoCoConfig:
    name: str = "diloco"
    sync_every: int = 50  # H: inner steps between two syncs of a fragment
    fragments: int = 1  # P: fragments of the model's blocks, synced in turn (<= model.n_layer)
    fragment_pattern: str = "strided"  # strided (blocks p, p+P, ...) | sequential
    overlap_steps: int = 0  # tau: inner steps between starting a fragment's sync and merging it
    merge_alpha: float = 0.0  # merge: local = alpha * local + (1 - alpha) * global
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True  # (Nesterov with outer_momentum=0 is plain SGD)
    compression: CompressionConfig = field(default_factory=CompressionConfig)  # of outer gradients
    recover_from: str = "checkpoint"  # checkpoint | peer_replica: what a lost replica restarts from

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.recover_from", self.recover_from, RECOVER_FROM)
        check(self.sync_every >= 1, f"{prefix}.sync_every", self.sync_every, "must be >= 1")
        check(1 <= self.fragments <= self.sync_every, f"{prefix}.fragments", self.fragments,
              f"must be in [1, {prefix}.sync_every={self.sync_every}]")
        one_of(f"{prefix}.fragment_pattern", self.fragment_pattern, PATTERNS)
        check(0 <= self.overlap_steps < self.sync_every, f"{prefix}.overlap_steps", self.overlap_steps,
              f"must be in [0, {prefix}.sync_every - 1 = {self.sync_every - 1}]")
        check(0 <= self.merge_alpha <= 1, f"{prefix}.merge_alpha", self.merge_alpha, "must be in [0, 1]")
        check(self.outer_lr > 0, f"{prefix}.outer_lr", self.outer_lr, "must be > 0")
        check(0 <= self.outer_momentum < 1, f"{prefix}.outer_momentum", self.outer_momentum, "must be in [0, 1)")
        try:
            compressor = self.compression.build(prefix=f"{prefix}.compression")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check(self.compression.zstd_level is None, f"{prefix}.compression.zstd_level", self.compression.zstd_level,
              "must be null: the outer all-reduce needs fixed-size payloads")
        check(compressor.chunkable and compressor.fixed_size, f"{prefix}.compression.name", self.compression.name,
              "the outer all-reduce needs a chunkable fixed-size compressor (none, bf16, int, fp4, ...; not powersgd)")

    def check_run(self, run: Any) -> None:
        """Checks against the whole run config, before any actor starts."""
        blocks = run.model.n_layer if run.model.name == "char_transformer" else len(run.model.hidden)
        check(self.fragments <= blocks, "strategy.fragments", self.fragments,
              f"must be <= the model's {blocks} blocks (model.n_layer / model.hidden)")

    def warn_run(self, run: Any) -> list[str]:
        """Legal settings that make a run look broken: fewer than two outer steps."""
        warnings = []
        if self.recover_from == "peer_replica" and self.overlap_steps:
            warnings.append(f"strategy.recover_from=peer_replica needs strategy.overlap_steps=0 (no sync in flight "
                            f"between steps); with overlap_steps={self.overlap_steps} a fault restores the checkpoint")
        outer = run.train.steps // self.sync_every
        if outer >= 2:
            return warnings
        return warnings + [
            f"train.steps={run.train.steps} gives {outer} outer step(s) with strategy.sync_every={self.sync_every}: "
            f"the eval scores the global (outer) parameters, which only move at an outer step; "
            f"use train.steps >= {2 * self.sync_every} or a smaller strategy.sync_every"]

    def eval_label(self, step: int) -> str:
        """What the run's eval loss scores (the summary says it beside the number)."""
        return f"global (outer) parameters, {step // self.sync_every} outer steps"


RECOVER_FROM = ("checkpoint", "peer_replica")


def peer_seeded(cfg: DiLoCoConfig, layout: Layout, seed_of: Callable[[int], str]) -> Layout:
    """`layout` with seed classes (`seed_of(rank)`) when `cfg.recover_from` is peer_replica and no
    sync is in flight between steps (overlap_steps = 0): a rank lost at a step with no outer sync
    is restored, with the rest of its replica, from a copy of a live peer replica that completed
    the step, and the other replicas keep their state (no rollback). The copied replica's inner
    progress since its last sync is replaced by the peer's. Otherwise: the newest checkpoint."""
    if cfg.recover_from != "peer_replica" or cfg.overlap_steps:
        return layout
    return replace(layout, seeds=tuple(seed_of(r) for r in range(len(layout.state_keys))))


class DiLoCoWorker(WorkerStrategy):
    replicas_identical = False
    failed_step_keeps_state = False  # inner steps are local: a failed outer sync leaves them applied
    eval_views = ("global", "replica_avg")

    @classmethod
    def layout(cls, cfg: DiLoCoConfig, world_size: int) -> Layout:
        return peer_seeded(cfg, super().layout(cfg, world_size), lambda r: "replica")

    def __init__(self, cfg: DiLoCoConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        parts = split_parameters(ctx.model, cfg.fragments, cfg.fragment_pattern)
        self.schedule = SyncSchedule(cfg.sync_every, cfg.fragments, cfg.overlap_steps)
        compressor = cfg.compression.build(rank=ctx.rank, prefix="strategy.compression")
        self.outer = OuterSync(parts, cfg, compressor, ctx.comm)
        self.step = 0  # inner steps taken
        self.bytes_total = 0
        self.peak_bytes_step = 0

    def train_step(self, batch, lr: float) -> dict[str, float]:
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=False)
        loss = ctx.loss(batch)
        loss.backward()
        grad_norm = clip_and_step(ctx, lr)
        self.step += 1
        metrics = {"loss": loss.item(), "grad_norm": grad_norm, "diloco/drift": self.outer.drift()}
        metrics.update(self._outer_step(self.step))
        return metrics

    def _outer_step(self, step: int) -> dict[str, float]:
        fragment = self.schedule.starting(step)
        sent = 0
        if fragment is not None:
            sent = self.outer.start(fragment, step, self.schedule.merge_step(step)).bytes_sent
        norms = [self.outer.finish(sync) for sync in self.outer.due(step)]
        self.bytes_total += sent
        self.peak_bytes_step = max(self.peak_bytes_step, sent)
        out = {"diloco/fragment": -1 if fragment is None else fragment, "diloco/bytes_this_step": sent,
               "diloco/bytes_total": self.bytes_total, "diloco/peak_bytes_step": self.peak_bytes_step,
               "diloco/in_flight": len(self.outer.in_flight), "diloco/merged": len(norms)}
        if norms:
            out["diloco/outer_grad_norm"] = max(norms)
        return out

    def finish_syncs(self) -> dict[str, float]:
        """Merge every sync still in flight, in the order they started (the end of a run)."""
        norms = [self.outer.finish(sync) for sync in list(self.outer.in_flight)]
        return {"diloco/merged": len(norms), "diloco/in_flight": len(self.outer.in_flight)}

    @contextlib.contextmanager
    def eval_parameters(self, view: str = "global") -> Iterator[None]:
        with self.outer.swapped(view):
            yield

    def set_comm(self, comm: Communicator) -> None:
        super().set_comm(comm)
        self.outer.set_comm(comm)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "bytes_total": self.bytes_total, "peak_bytes_step": self.peak_bytes_step,
                "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.bytes_total = state["step"], state["bytes_total"]
        self.peak_bytes_step = state["peak_bytes_step"]
        self.outer.load_state_dict(state["outer"])


class DiLoCoDriver(DriverStrategy):
    """Peer to peer (every worker: `train_step`); at the end, merge the syncs still in flight."""

    def finish(self, workers: WorkerCalls) -> None:
        workers.get(workers.call("finish_syncs"))


register("diloco", DiLoCoConfig, DiLoCoWorker, DiLoCoDriver)
