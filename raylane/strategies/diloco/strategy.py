"""diloco: DiLoCo and Streaming DiLoCo (Douillard et al. 2023, 2025), strategy `diloco`.

Every worker is a replica training on its own data with the run's optimizer (the inner
optimizer; the papers use AdamW lr 4e-4, weight decay 0.1, betas 0.9/0.95: `optim.lr=4e-4
optim.weight_decay=0.1`). The model's blocks are split into `fragments` (P, see
fragments.py); fragment p's outer sync starts after inner step t when
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
from typing import Any, Iterator

from raylane.comm import Communicator
from raylane.strategies.base import Layout, WorkerContext, WorkerStrategy, register
from raylane.strategies.ddp import clip_and_step
from raylane.strategies.diloco.core import DiLoCoConfig, DiLoCoDriver, OuterLoop, peer_seeded
from raylane.strategies.diloco.fragments import split_parameters

__all__ = ["DiLoCoConfig", "DiLoCoDriver", "DiLoCoWorker"]


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
        self.loop = OuterLoop(cfg, parts, ctx.comm, ctx.rank, byzantine=lambda: self.ctx.comm.byzantine)
        self.outer = self.loop.outer

    def train_step(self, batch, lr: float) -> dict[str, float]:
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=False)
        loss = ctx.loss(batch)
        loss.backward()
        grad_norm = clip_and_step(ctx, lr)
        return {"loss": loss.item(), "grad_norm": grad_norm, **self.loop.advance()}

    def finish_syncs(self) -> dict[str, float]:
        return self.loop.finish_syncs()

    @contextlib.contextmanager
    def eval_parameters(self, view: str = "global") -> Iterator[None]:
        with self.outer.swapped(view):
            yield

    def set_comm(self, comm: Communicator) -> None:
        super().set_comm(comm)
        self.outer.set_comm(comm)

    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state)


register("diloco", DiLoCoConfig, DiLoCoWorker, DiLoCoDriver)
