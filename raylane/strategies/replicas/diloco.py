"""replica_diloco: DiLoCo / Streaming DiLoCo across multi-rank replicas (strategy `replica_diloco`).

Each replica (R = cluster.ranks_per_replica ranks) takes its inner steps with its engine (torch inner
ddp, or DeepSpeed ZeRO 0-3: strategies/replicas/hsdp.py). The outer sync is strategies/diloco/strategy.py's, run shard by shard: local
rank s keeps the global (outer) parameters, the outer momentum and the syncs in flight only for the
slice of the fp32 master parameters it owns, and all-reduces that slice's outer gradient over the
`outer` group (the rank s of every replica); the full model is never gathered on one rank for it.
After a merge the engine publishes the new shards inside the replica (an inner all-gather, counted
as comm/inner; ZeRO-3 only writes its partition). Streaming fragments are cut along the same
shards (a rank syncs the part of fragment p it owns); with ZeRO-3 the partition is not a slice of
the parameter vector, so fragments must be 1 (a config error otherwise).

Keys: one state per (replica, shard): `replica_<q>_shard_<s>`. Recovery (`recover_from`, default
`peer_replica` here): a rank lost at a step with no outer sync takes its replica with it: every rank
of that replica gets a copy of shard s of the lowest live replica that completed the step (seed class
`shard_<s>`), the other replicas keep their state and the step stands; a fault in an outer sync (every
replica's step failed), overlap_steps > 0 or `recover_from=checkpoint` restore the newest checkpoint.
A replica whose lost rank is not replaced is dropped whole (elastic by replicas): the Q' replicas left
are renumbered in rank order and, when they restore a checkpoint, load replicas 0..Q'-1 of it (each
rank the shard of its local rank of one saved replica: a replica's shards come from one replica).
A replica that grows back (`maybe_grow`) starts as a copy of a live replica (the same seed classes).
The evaluation view is "global" (the outer parameters, published into the replica for the duration).
Metrics as diloco's (diloco/bytes_this_step: this rank's outer payload, i.e. its shard's), plus the
engine metrics of strategies/replicas/hsdp.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from raylane.strategies.base import Layout, WorkerContext, register
from raylane.strategies.diloco.core import DiLoCoConfig, DiLoCoDriver, OuterLoop, peer_seeded
from raylane.strategies.diloco.fragments import split_parameters
from raylane.strategies.replicas.engine import owned_pieces
from raylane.strategies.replicas.hsdp import EngineKeys, ReplicaWorker, bind_cluster, check_engine, replica_layout
from raylane.validation import check


@dataclass
class ReplicaDiLoCoConfig(EngineKeys, DiLoCoConfig):
    """diloco's keys and the engine keys (replicas.EngineKeys); inner steps clip by the replica's norm."""

    name: str = "replica_diloco"
    recover_from: str = "peer_replica"  # a lost rank's replica restarts from a live peer replica (strategies/diloco/strategy.py)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_engine(self, prefix)
        check(not (self.engine == "deepspeed" and self.zero_stage == 3 and self.fragments > 1),
              f"{prefix}.fragments", self.fragments, "must be 1 with engine=deepspeed zero_stage=3 (a ZeRO-3 "
              "partition is not a slice of the parameter vector); use zero_stage <= 2 for streaming")

    def check_run(self, run: Any) -> None:
        super().check_run(run)
        bind_cluster(self, run)


class ReplicaDiLoCoWorker(ReplicaWorker):
    replicas_identical = False
    failed_step_keeps_state = False  # inner steps are local: a failed outer sync leaves them applied
    eval_views = ("global",)

    def __init__(self, cfg: ReplicaDiLoCoConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.loop = OuterLoop(cfg, self._parts(), ctx.comms["outer"], ctx.rank, byzantine=lambda: self.ctx.comm.byzantine,
                              row_of=lambda r: r // cfg.ranks_per_replica)
        self.outer = self.loop.outer

    def _parts(self) -> list[list[tuple[str, Any]]]:
        """Per fragment: (name, view of this rank's fp32 master) for each piece of it this rank owns."""
        owned = self.engine.owned
        if owned[0].flat is None:  # ZeRO-3: the whole partition is the one fragment
            return [[(f"partition{i}", s.master) for i, s in enumerate(owned)]]
        fragments = split_parameters(self.ctx.model, self.cfg.fragments, self.cfg.fragment_pattern)
        return [[piece for shard in owned for piece in owned_pieces(shard, frag)] for frag in fragments]

    @classmethod
    def layout(cls, cfg: ReplicaDiLoCoConfig, world_size: int) -> Layout:
        layout = replica_layout(world_size, cfg.ranks_per_replica, lambda q, s: f"replica_{q}_shard_{s}")
        return peer_seeded(cfg, layout, lambda r: f"shard_{r % cfg.ranks_per_replica}")

    def train_step(self, batch: Any, lr: float) -> dict[str, float]:
        loss, norm = self.engine.train_step(batch, lr)
        metrics = {"loss": loss, "grad_norm": norm, **self.loop.advance()}
        if metrics["diloco/merged"]:
            self.engine.publish()
        metrics.update(self.engine_metrics())
        return metrics

    def finish_syncs(self) -> dict[str, float]:
        """diloco's, then publish the merged shards inside the replica."""
        out = self.loop.finish_syncs()
        if out["diloco/merged"]:
            self.engine.publish()
        return out

    @contextlib.contextmanager
    def eval_parameters(self, view: str = "global") -> Iterator[None]:
        try:
            with self.outer.swapped(view):
                self.engine.publish()
                yield
        finally:
            self.engine.publish()

    def set_comm(self, comm: Any) -> None:
        """A DeepSpeed engine is rebuilt with new fp32 master tensors (the same pieces, as the replica
        keeps its size): the outer sync's local views are re-pointed at them."""
        super().set_comm(comm)
        self.outer.set_comm(self.ctx.comms["outer"])
        for fragment, part in zip(self.outer.fragments, self._parts()):
            assert fragment.names == [name for name, _ in part], (fragment.names, part)
            fragment.local = [piece for _, piece in part]

    def state_dict(self) -> dict[str, Any]:
        return {**self.loop.state_dict(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.loop.load_state_dict(state)


register("replica_diloco", ReplicaDiLoCoConfig, ReplicaDiLoCoWorker, DiLoCoDriver)
