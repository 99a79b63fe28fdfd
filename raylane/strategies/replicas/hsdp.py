"""Multi-rank replicas: R = `cluster.ranks_per_replica` ranks train one replica together with an inner
engine (`strategy.engine`: torch | deepspeed, `strategy.zero_stage` 0-3 for deepspeed), and an outer
strategy syncs the replicas. This module holds what both outer strategies share, and `hsdp`.

Layout (rank r = replica r // R, local rank r % R): groups `inner` (the R ranks of each replica) and
`outer` (the ranks with the same local rank in every replica). Each local rank owns one shard of the
replica's fp32 master parameters (strategies/replicas/engine.py) and syncs only that shard across replicas.
The layout is elastic by whole replicas (`unit` = R): a lost rank is replaced; when its replacement
does not come up, its whole replica is dropped and the run goes on with fewer replicas (replicas
are renumbered in rank order; `cluster.min_workers` must then be a multiple of R).
`cluster.ranks_per_replica` reaches the strategy config (`ranks_per_replica`, not a user key)
through `check_run` at validation, because a layout sees only the strategy config.

`hsdp`: ddp across replicas, HSDP-like. Every step's gradient is the mean over all ranks: averaged
inside the replica by the engine, then the owned shard is all-reduced across replicas (engine=torch:
inner reduce-scatter, outer all-reduce, inner all-gather; deepspeed: an optimizer pre-step hook on
the partition DeepSpeed has just reduced; ZeRO-0 shard by shard as engine=torch). Clipping
(`clip`): `global` (default) clips by the norm of the gradient averaged over all replicas, as ddp
does; `replica` clips each replica's gradient by its own norm before the average (DeepSpeed's
gradient_clipping inside the replica). Replicas stay identical: one state key per shard
(`shard_<s>`) with ZeRO >= 1, else `replica`.
Caveat (deepspeed): a rank lost inside DeepSpeed's post-step all-gather leaves its replica-mates'
partitions stepped; recovery copies the live replica's state only to the replaced rank.
Metrics (rank 0's): deepspeed/bytes_sent (DeepSpeed's own traffic, counted as issued and also part
of the inner Communicator's bytes: strategies/replicas/ds_comm.py),
engine/optimizer_state_bytes (the optimizer's state tensors on this rank), engine/master_bytes
(DeepSpeed's fp32 master partition), engine/param_bytes (the working parameters this rank holds
between steps: ZeRO-3's partitions), engine/peak_rss_bytes.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from raylane.strategies.base import Layout, WorkerContext, WorkerStrategy, register
from raylane.strategies.replicas.engine import ENGINES, ZERO_STAGES, TorchEngine
from raylane.validation import check, one_of


def check_engine(cfg: Any, prefix: str) -> None:
    """The engine keys: engine=torch is inner ddp with replicated state (zero_stage null or 0, no
    ds_config); engine=deepspeed reads ds_config and settles zero_stage (strategies/replicas/ds_config.py)."""
    one_of(f"{prefix}.engine", cfg.engine, ENGINES)
    if cfg.engine == "torch":
        check(cfg.zero_stage in (None, 0), f"{prefix}.zero_stage", cfg.zero_stage,
              "engine=torch replicates parameters and optimizer state (ZeRO-0); ZeRO stages 1-3 need "
              f"{prefix}.engine=deepspeed")
        check(cfg.ds_config is None, f"{prefix}.ds_config", cfg.ds_config, f"needs {prefix}.engine=deepspeed")
        for key in ("max_live_parameters", "prefetch_bucket_size", "max_reuse_distance"):
            check(getattr(cfg, key) is None, f"{prefix}.{key}", getattr(cfg, key),
                  f"a ZeRO-3 limit: needs {prefix}.engine=deepspeed {prefix}.zero_stage=3")
        return
    from raylane.strategies.replicas.ds_config import resolve

    resolve(cfg, prefix)
    one_of(f"{prefix}.zero_stage", cfg.zero_stage, ZERO_STAGES)


def bind_cluster(cfg: Any, run: Any) -> None:
    """Record the run's replica shape (and what DeepSpeed's config derives from the run) in the strategy
    config: a layout and an engine see only that."""
    cfg.ranks_per_replica = run.cluster.ranks_per_replica
    cfg.eval_batches = run.data.eval_batches
    cfg.batch_size, cfg.grad_clip = run.data.batch_size, run.optim.grad_clip
    if cfg.engine == "deepspeed":
        import importlib.util

        from raylane.strategies.replicas.ds_config import check_run

        check(importlib.util.find_spec("deepspeed") is not None, "strategy.engine", cfg.engine,
              "needs the deepspeed package (a raylane dependency): pip install deepspeed==0.19.8")
        check_run(cfg, run)


@dataclass
class EngineKeys:
    """The inner-engine keys both replica strategies take (configs/strategy/hsdp.yaml documents them)."""

    engine: str = "torch"  # torch | deepspeed
    zero_stage: int | None = None  # deepspeed's ZeRO stage 0-3; null: ds_config's, else 1
    ds_config: Any = None  # deepspeed: a DeepSpeed JSON/YAML path or a mapping (strategies/replicas/ds_config.py)
    max_live_parameters: int | None = None  # ZeRO-3: stage3_max_live_parameters (null: DeepSpeed's)
    prefetch_bucket_size: int | None = None  # ZeRO-3: stage3_prefetch_bucket_size
    max_reuse_distance: int | None = None  # ZeRO-3: stage3_max_reuse_distance
    ranks_per_replica: int = field(default=1, init=False)  # from cluster.ranks_per_replica (check_run)
    eval_batches: int = field(default=8, init=False)  # from data.eval_batches (check_run)
    batch_size: int = field(default=1, init=False)  # from data.batch_size (check_run)
    grad_clip: float = field(default=0.0, init=False)  # from optim.grad_clip (check_run)


def replica_layout(world_size: int, ranks_per_replica: int, key: Callable[[int, int], str]) -> Layout:
    """inner/outer groups for replicas of R ranks; `key(replica, local_rank)` names each rank's state.
    Elastic by whole replicas: the world shrinks and grows by units of R ranks."""
    r = ranks_per_replica
    if world_size % r:
        raise ValueError(f"a world of {world_size} ranks is not whole replicas of {r} ranks")
    inner = tuple(tuple(range(i * r, (i + 1) * r)) for i in range(world_size // r))
    outer = tuple(tuple(range(s, world_size, r)) for s in range(r))
    keys = tuple(key(q // r, q % r) for q in range(world_size))
    return Layout(keys, (None,) * world_size, {"inner": inner, "outer": outer}, elastic=True, unit=r)


def sharded(cfg: Any) -> bool:
    """Whether the local ranks of a replica hold different state (ZeRO >= 1 shards the optimizer)."""
    return cfg.engine == "deepspeed" and (cfg.zero_stage or 0) >= 1


class ReplicaWorker(WorkerStrategy):
    """A rank of a multi-rank replica: builds the inner engine over `ctx.comms["inner"]`."""

    hosts_replicas: ClassVar[bool] = True

    def __init__(self, cfg: Any, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.replica = ctx.rank // cfg.ranks_per_replica
        self.engine = build_engine(cfg, ctx, ctx.comms["inner"], self.replica)

    @classmethod
    def builds_model_in_group(cls, cfg: Any) -> bool:
        """ZeRO-3 builds the model partitioned, inside the replica's group (`build_model_in_group`)."""
        return cfg.engine == "deepspeed" and cfg.zero_stage == 3

    @classmethod
    def build_model_in_group(cls, cfg: Any, build: Callable[[], torch.nn.Module], store: Any,
                             rank: int) -> torch.nn.Module:
        from raylane.strategies.replicas.deepspeed import build_partitioned

        return build_partitioned(cfg, build, store, rank)

    def set_comm(self, comm: Any) -> None:
        super().set_comm(comm)
        self.replica = self.ctx.rank // self.cfg.ranks_per_replica
        self.engine.replica = self.replica
        self.engine.set_comm(self.ctx.comms["inner"], self.ctx.store)

    def engine_metrics(self) -> dict[str, float]:
        return {"deepspeed/bytes_sent": self.engine.extra_bytes_sent(),
                "engine/optimizer_state_bytes": self.engine.optimizer_state_bytes(),
                "engine/master_bytes": self.engine.master_bytes(), "engine/param_bytes": self.engine.param_bytes(),
                "engine/peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def evaluate(self, num_shards: int) -> dict[str, tuple[float, int]] | None:
        """ZeRO-3 gathers parameters inside every forward: the ranks of a replica evaluate the same
        batches (the replica's share) in lock step and only local rank 0 counts them, in the worker's
        shape (loss sum, batches; `<view>/accuracy`: correct, samples). Otherwise None: the
        worker's own loop."""
        if not (self.cfg.engine == "deepspeed" and self.cfg.zero_stage == 3):
            return None
        ctx, r = self.ctx, self.cfg.ranks_per_replica
        counts = ctx.rank % r == 0
        bs = ctx.batch(0)[1].shape[0]
        device = next(ctx.model.parameters()).device
        out: dict[str, tuple[float, int]] = {}
        for view in self.eval_views:
            total, count, correct, samples = 0.0, 0, 0, 0
            with self.eval_parameters(view), torch.no_grad():
                for i in range(self.replica, self.cfg.eval_batches, max(1, num_shards // r)):
                    x, y = (t.to(device) for t in ctx.data.eval_batch(i, bs))
                    logits = ctx.model(x)  # the worker's loss_fn, on logits kept for the accuracy
                    total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
                    count += 1
                    correct += int((logits.argmax(-1) == y).sum())
                    samples += y.numel()
            out[view] = (total, count) if counts else (0.0, 0)
            if getattr(ctx.data, "classification", False):
                out[f"{view}/accuracy"] = (correct, samples) if counts else (0, 0)
        self.engine.release()  # a checkpoint after it holds partitions, not gathered parameters
        return out

    @torch.no_grad()
    def full_parameters(self) -> torch.Tensor:
        """The first evaluation view's parameters as one flat fp32 vector, whole also under ZeRO-3 (a
        collective inside the replica: every rank of it calls this)."""
        with self.eval_parameters(self.eval_views[0]), self.engine.gathered():
            flat = torch.cat([p.detach().reshape(-1).cpu().float() for p in self.ctx.model.parameters()])
        self.engine.release()
        return flat

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])


CLIP_SCOPES = ("global", "replica")


@dataclass
class HSDPConfig(EngineKeys):
    name: str = "hsdp"
    clip: str = "global"  # optim.grad_clip by the norm of the gradient averaged over all replicas | each replica's

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.clip", self.clip, CLIP_SCOPES)
        check(self.clip == "global" or self.engine == "deepspeed", f"{prefix}.clip", self.clip,
              f"engine=torch clips by the global norm only; clip=replica needs {prefix}.engine=deepspeed")
        check_engine(self, prefix)

    def check_run(self, run: Any) -> None:
        bind_cluster(self, run)

    def warn_run(self, run: Any) -> list[str]:
        """One rank per replica: nothing is sharded, the run is exactly ddp."""
        if run.cluster.ranks_per_replica > 1:
            return []
        return ["cluster.ranks_per_replica=1: each replica is one rank, so strategy=hsdp trains exactly as ddp; "
                "set cluster.ranks_per_replica >= 2 (dividing cluster.num_workers) to shard a replica"]


class HSDPWorker(ReplicaWorker):
    replicas_identical = True

    @classmethod
    def layout(cls, cfg: HSDPConfig, world_size: int) -> Layout:
        return replica_layout(world_size, cfg.ranks_per_replica,
                              (lambda q, s: f"shard_{s}") if sharded(cfg) else (lambda q, s: "replica"))

    def train_step(self, batch: Any, lr: float) -> dict[str, float]:
        loss, norm = self.engine.train_step(batch, lr, outer=self.ctx.comms["outer"])
        return {"loss": loss, "grad_norm": norm, **self.engine_metrics()}


def build_engine(cfg: Any, ctx: WorkerContext, inner: Any, replica: int) -> Any:
    """The engine `cfg.engine` names (cfg: the strategy config, validated and bound to the run)."""
    if cfg.engine == "torch":
        return TorchEngine(ctx, inner)
    from raylane.strategies.replicas.deepspeed import DeepSpeedEngine  # deepspeed is imported only here

    return DeepSpeedEngine(ctx, inner, cfg, replica)


register("hsdp", HSDPConfig, HSDPWorker)
