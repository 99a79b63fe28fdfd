"""DeepSpeed inside a replica: `deepspeed.initialize` over the replica's R ranks, ZeRO stage 0-3, with
the user's DeepSpeed config (`strategy.ds_config`, merged under raylane's keys: strategies/replicas/ds_config.py).

DeepSpeed needs the torch.distributed *default* group; each rank belongs to one replica, so the
default group is the replica's inner group, formed per generation under the store prefix
`gen<n>/deepspeed/<replica>` (`join_default_group`). ZeRO-3 builds the model partitioned: the worker
asks the strategy to build it (`build_partitioned`), which joins the default group first and builds
the model inside `deepspeed.zero.Init`, so no rank ever holds the whole model; the live-parameter,
prefetch and reuse limits are strategy keys (max_live_parameters, prefetch_bucket_size,
max_reuse_distance). After a fault (`set_comm`) the old engine is destroyed (its gradient hooks
removed), DeepSpeed's cached groups are released (`deepspeed.comm.destroy_process_group`) and a
fresh engine is built over the new generation; each rank keeps its own parameters (not the initial
broadcast from local rank 0, which may be a fresh replacement) and its optimizer state. ZeRO-3: the
module's partitioned parameters are replaced by plain ones of their full shape (zeros: the lost
rank's partitions are gone) and DeepSpeed's module attributes are dropped (`_unpartition`); the new
engine partitions them afresh (same shapes and replica size: the same partition per rank, module and
parameter ids numbered as in a fresh process) and each rank writes back its own fp32 partition; a
replacement gets its partition from a peer replica (hsdp) or the checkpoint, via `load_state_dict`.
DeepSpeed's state here (fp32 partitions) holds tensors only: nothing is unpickled.

The optimizer is the worker's torch optimizer (`optimizer=`: no DeepSpeed CPU-Adam build needed, also
with offload); ZeRO 1-3 re-point its param groups at this rank's fp32 partitions, so
`optimizer.state_dict()` is this rank's shard of the optimizer state (ZeRO-3 empties the groups
inside its step, so between steps the engine puts the partitions back: `_at_rest`). The lr is set on
it every step. Gradient accumulation (the user's `gradient_accumulation_steps`): a raylane step cuts
the rank's batch into that many micro-batches and steps once. bf16/fp16: the module runs in that
dtype (floating inputs are cast to it); the fp32 partitions are the master, kept in checkpoints.

Gradients across replicas (hsdp, `outer` given) and clipping, in an optimizer pre-step hook:
- ZeRO 1-3: DeepSpeed has reduced each partition inside the replica; the hook all-reduces it across
  replicas. clip=global (default): DeepSpeed does not clip; the hook clips by the norm of the
  averaged gradient over all partitions (ddp's norm). clip=replica: DeepSpeed clips by the replica's
  norm before the average. replica_diloco: DeepSpeed clips by the replica's norm (its inner steps).
- ZeRO-0: DeepSpeed's own all-reduce is off; the hook reduces shard by shard as engine=torch does
  (inner reduce-scatter, outer all-reduce of the owned shard, inner all-gather) and clips the shard
  (by the replica's or the global norm, as above).

Bytes: DeepSpeed's own collectives are counted as they are issued, in the inner Communicator
(strategies/replicas/ds_comm.py): they are part of the step's bytes, `comm/inner/bytes_sent` and the summary;
`extra_bytes_sent()` (metric deepspeed/bytes_sent) is their share. DeepSpeed's comms logger stays off
unless the user's config turns it on (it syncs the device after every collective).
On CPU the shared-memory allreduce op (used only for inference) is disabled, so nothing is compiled.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from raylane.comm import Communicator
from raylane.strategies.base import StoreAddress, WorkerContext
from raylane.strategies.replicas.ds_comm import count_into, deepspeed_bytes
from raylane.strategies.replicas.ds_config import merged, mixed_dtype
from raylane.strategies.replicas.engine import OwnedShard, padded, state_bytes


def _import_deepspeed(device: torch.device) -> Any:
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # one device per Ray actor: its device 0
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op; skip its JIT build
    return deepspeed


_JOINED: list[Any] = [None]  # (store, replica, rank, size) of the default group this process is in


def join_default_group(store: StoreAddress, replica: int, rank: int, size: int) -> None:
    """(Re-)form the default group as this replica's generation `store.generation` (no-op if joined)."""
    from deepspeed.comm import comm as ds_comm

    if dist.is_initialized() and _JOINED[0] == (store, replica, rank, size):
        return
    if dist.is_initialized():  # through DeepSpeed, which then drops its cached groups of the old generation
        ds_comm.destroy_process_group() if ds_comm.cdb is not None else dist.destroy_process_group()
    timeout = datetime.timedelta(seconds=store.timeout_s)
    client = dist.TCPStore(store.host, store.port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"gen{store.generation}/deepspeed/{replica}", client)
    dist.init_process_group(store.backend, store=prefixed, rank=rank, world_size=size, timeout=timeout)
    _JOINED[0] = (store, replica, rank, size)


def build_partitioned(cfg: Any, build: Any, store: StoreAddress, rank: int) -> torch.nn.Module:
    """ZeRO-3: `build()` inside `deepspeed.zero.Init` over this rank's replica (joined here first), so
    each module's parameters are partitioned as soon as it is built (initialisers that run through
    `Module.apply` see them gathered). The same seed gives the same model as a plain build. Only at the
    run's first group generation, where every rank builds; a later replacement builds it plainly."""
    if store.generation > 0:
        # a replacement joining live replica-mates, which do not build with it (zero.Init broadcasts and
        # gathers per module): it builds the plain model once, and its engine partitions it
        return build()
    r = cfg.ranks_per_replica
    device = torch.device("cuda", 0) if torch.cuda.is_available() and store.backend == "nccl" else torch.device("cpu")
    ds = _import_deepspeed(device)
    join_default_group(store, rank // r, rank % r, r)
    ds.init_distributed(dist_backend=store.backend, dist_init_required=False)
    # the dtype comes from the config (zero.Init's own `dtype=` argument is ignored on a CPU without fp16)
    with ds.zero.Init(config_dict_or_path=merged(cfg, ds_clips=True)):
        return build()


def _restart_zero3_ids() -> None:
    """Number modules and parameters from 0, as in a fresh process: ZeRO-3's first traced step checks
    that the ranks of a replica agree on these ids, and a rebuilt rank's process-wide counters (one of
    them a mutable default argument) have run on since its first engine."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import Init

    Init.param_id = 0
    DeepSpeedZeRoOffload._register_deepspeed_module.__defaults__[0][0] = 0


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, ctx: WorkerContext, inner: Communicator, cfg: Any, replica: int):
        self.ctx, self.inner, self.stage, self.replica = ctx, inner, cfg.zero_stage, replica
        device = next(ctx.model.parameters()).device
        self.ds = _import_deepspeed(device)
        self.outer: Communicator | None = None
        # hsdp clips by the norm of the gradient averaged across replicas unless clip=replica; ZeRO-0's
        # gradient is reduced by the hook, after which raylane clips in either scope
        self.clip_scope = "global" if getattr(cfg, "clip", "replica") == "global" else "replica"
        self.own_clip = self.stage == 0 or self.clip_scope == "global"
        self.config = merged(cfg, ds_clips=not self.own_clip)
        self.micro_batches = self.config["gradient_accumulation_steps"]
        self.dtype = mixed_dtype(cfg.ds_config)
        self._norm: float | None = None
        if self.dtype != torch.float32:  # floating inputs (features) in the module's dtype
            ctx.model.register_forward_pre_hook(self._cast_inputs)
        ctx.optimizer.register_step_pre_hook(self._sync_across_replicas)
        if self.stage == 0:
            self._flatten()
        # ZeRO-3 adds attributes to every module; `_unpartition` drops them before a rebuild
        self._plain_attrs = [(m, set(m.__dict__)) for m in ctx.model.modules()]
        join_default_group(ctx.store, replica, inner.rank, inner.world_size)
        self._build()

    # -- engine -----------------------------------------------------------------------
    def _flatten(self) -> None:
        """ZeRO-0 keeps the module's parameters: make them views into one flat padded buffer."""
        params = self._params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        self.flat = torch.zeros(padded(n, self.inner.world_size), dtype=params[0].dtype, device=params[0].device)
        self.flat_grad = torch.zeros_like(self.flat)
        off = 0
        with torch.no_grad():
            for p in params:
                self.flat[off:off + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[off:off + p.numel()].view_as(p)
                off += p.numel()

    def _build(self) -> None:
        if self.stage == 3:
            _restart_zero3_ids()
        count_into(self.inner.stats)
        self.engine, *_ = self.ds.initialize(model=self.ctx.model, optimizer=self.ctx.optimizer,
                                             config=self.config, dist_init_required=False)
        if self.stage == 0:
            self.engine.enable_backward_allreduce = False  # the pre-step hook reduces, shard by shard
        self._index()
        self._at_rest()
        self._ds_counted = deepspeed_bytes(self.inner.stats)  # the initial broadcast is not a step's traffic

    def _at_rest(self) -> None:
        """ZeRO-3 empties the torch optimizer's param groups outside its step (it fills them per
        sub-group inside): between steps they hold this rank's fp32 partitions, as with ZeRO 1-2."""
        if self.stage == 3:
            self.engine.optimizer._clear_fp32_optimizer_param_groups()
            self.engine.optimizer._set_fp32_optimizer_param_groups()

    def _index(self) -> None:
        opt, rank, size = self.engine.optimizer, self.inner.rank, self.inner.world_size
        if self.stage == 0:
            n = self.flat.numel() // size
            self.owned = [OwnedShard(self.flat[rank * n:(rank + 1) * n], rank * n, self.flat)]
        elif self.stage in (1, 2):
            self.owned = [OwnedShard(master, sum(t.numel() for t in parts[:rank]), flat)
                          for master, parts, flat in zip(opt.single_partition_of_fp32_groups,
                                                         opt.parallel_partitioned_bit16_groups,
                                                         opt.bit16_groups_flat)]
        else:
            self.owned = [OwnedShard(master, -1, None) for master in opt.fp32_partitioned_groups_flat]

    # -- a step -----------------------------------------------------------------------
    def _cast_inputs(self, module: torch.nn.Module, args: tuple) -> tuple:
        return tuple(a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    @torch.no_grad()
    def _sync_across_replicas(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer pre-step hook: the replica's reduced gradient averaged across replicas, and clipped."""
        outer = self.outer if self.outer is not None and self.outer.world_size > 1 else None
        if self.stage == 0:
            self._sync_flat(outer)
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if outer is not None:
            for g in grads:
                outer.allreduce(g, op="avg")
        if self.own_clip:
            self._norm = self._clip(grads)

    def _sync_flat(self, outer: Communicator | None) -> None:
        """ZeRO-0: reduce-scatter inside the replica, all-reduce the owned shard across replicas, clip,
        all-gather inside (engine=torch's hsdp_average, with clipping between)."""
        params, g, off = self._params, self.flat_grad, 0
        for p in params:
            g[off:off + p.numel()].copy_(p.grad.reshape(-1) if p.grad is not None else 0)
            off += p.numel()
        many = self.inner.world_size > 1
        chunk = self.inner.reduce_scatter(g, op="avg") if many else g
        if self.clip_scope == "replica":
            self._norm = self._clip([chunk])
        if outer is not None:
            outer.allreduce(chunk, op="avg")
        if self.clip_scope == "global":
            self._norm = self._clip([chunk])
        if many:
            g.copy_(torch.cat(self.inner.allgather(chunk)))
        off = 0
        for p in params:
            p.grad = g[off:off + p.numel()].view_as(p).clone()
            off += p.numel()

    def _clip(self, shards: list[torch.Tensor]) -> float:
        """Clip the disjoint `shards` of the replica's gradient by their joint norm (summed over the
        replica's ranks) to `grad_clip`, as torch's clip_grad_norm_; returns the norm."""
        sq = torch.stack([s.detach().float().pow(2).sum() for s in shards]).sum().reshape(1)
        if self.inner.world_size > 1:
            self.inner.allreduce(sq, op="sum")
        norm = float(sq.sqrt())
        max_norm = float(self.ctx.grad_clip)
        coef = max_norm / (norm + 1e-6)
        if max_norm > 0 and coef < 1:
            for s in shards:
                s.mul_(coef)
        return norm

    def train_step(self, batch: Any, lr: float, outer: Communicator | None = None) -> tuple[float, float]:
        """One optimizer step over the rank's batch, cut into `micro_batches` (gradient accumulation)."""
        for group in self.ctx.optimizer.param_groups:
            group["lr"] = lr
        self.outer, self._norm = outer, None
        if self.stage == 3:  # its step fills the groups one sub-group at a time
            self.engine.optimizer._clear_fp32_optimizer_param_groups()
        losses = []
        try:
            for micro in zip(*(t.chunk(self.micro_batches) for t in batch)):
                loss = self.ctx.loss(micro)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.item())
        finally:
            self.outer = None
            self._at_rest()
        norm = self._norm if self._norm is not None else self.engine.get_global_grad_norm()
        return sum(losses) / len(losses), float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def publish(self) -> None:
        """After the owned fp32 shards changed: into DeepSpeed's working copy (all-gathered inside
        the replica through the inner Communicator; ZeRO-3 keeps only the partition)."""
        opt = self.engine.optimizer
        for i, shard in enumerate(self.owned):
            if self.stage == 3:
                opt.fp16_partitioned_groups_flat[i].copy_(shard.master)
                continue
            if self.stage in (1, 2):
                opt.parallel_partitioned_bit16_groups[i][self.inner.rank].copy_(shard.master)
            gathered = torch.cat(self.inner.allgather(shard.master.detach().clone()))
            shard.flat[:gathered.numel()].copy_(gathered)

    def release(self) -> None:
        """ZeRO-3: drop whatever parameters are still gathered (evaluation leaves them so), so that the
        module holds only its partitions again (and its state_dict, placeholders)."""
        if self.stage == 3:
            self.engine.optimizer.empty_partition_cache()

    def gathered(self) -> Any:
        """A context in which the module holds its whole parameters (ZeRO-3: gathered inside the
        replica, a collective every rank of the replica enters; else nothing to do)."""
        return self.ds.zero.GatheredParameters(list(self.ctx.model.parameters()), enabled=self.stage == 3)

    # -- faults and state -------------------------------------------------------------
    def set_comm(self, inner: Communicator, store: StoreAddress) -> None:
        assert inner.world_size == self.inner.world_size, \
            "the replica's size changed: recovery keeps replicas whole (layout.unit = ranks_per_replica)"
        frozen = [n for n, p in self.ctx.model.named_parameters() if not p.requires_grad]
        if self.stage == 3 and frozen:  # their partitions are in no fp32 state a peer or checkpoint holds
            raise NotImplementedError(f"recovery in place of a ZeRO-3 replica with frozen parameters ({frozen[0]}, "
                                      "...) is not implemented; use zero_stage <= 2")
        opt = self.ctx.optimizer
        saved = opt.state_dict()  # this rank's partition of the optimizer state, by index
        # ZeRO-3: this rank's fp32 partition (its step follows its last collective, so a failed step
        # left it as of the last applied step); ZeRO 0-2: empty (the master comes from the module)
        own = self.state_dict()
        self.engine.destroy()
        if self.stage == 3:
            params = self._unpartition()
        else:
            params = [p for p in self.ctx.model.parameters() if p.requires_grad]
            for p in params:
                p.grad = None  # a failed step may have left gradients the new engine would add to
            kept = [p.detach().clone() for p in params]  # this rank's parameters as of its last applied step
        opt.param_groups[0]["params"] = params  # back to the module's parameters, as DeepSpeed expects
        opt.state.clear()
        self.inner = inner
        join_default_group(store, self.replica, inner.rank, inner.world_size)
        self._build()  # broadcasts the module from local rank 0, which may be a fresh replacement
        if self.stage != 3:
            with torch.no_grad():
                for p, value in zip(params, kept):
                    p.copy_(value)
        self.load_state_dict(own)  # ZeRO-3: the saved partition; else the master from the module
        opt.load_state_dict(saved)  # by index: the same partition of the same replica size

    @torch.no_grad()
    def _unpartition(self) -> list[torch.nn.Parameter]:
        """ZeRO-3, engine destroyed: make the module as a fresh process's, so that the next engine
        partitions it afresh as in a replacement. Plain parameters of the full shapes (zeros; tied
        ones stay tied) replace the partitioned ones, which belong to the lost group; DeepSpeed's
        module attributes go (its backward hooks' autograd functions hold the old engine), and so
        does the module's entry on its forward stack. Returns the trainable parameters."""
        from deepspeed.runtime.zero import parameter_offload

        fresh: dict[int, torch.nn.Parameter] = {}
        for module, attrs in self._plain_attrs:
            plain = {}
            for name, p in module._parameters.items():
                if p is not None and hasattr(p, "ds_shape"):
                    if id(p) not in fresh:
                        t = p.ds_tensor
                        fresh[id(p)] = torch.nn.Parameter(torch.zeros(p.ds_shape, dtype=t.dtype, device=t.device),
                                                          requires_grad=p.requires_grad)
                    p = fresh[id(p)]
                plain[name] = p
            for attr in set(module.__dict__) - attrs:
                del module.__dict__[attr]
            module._parameters = plain  # also drops DeepSpeed's ZeROOrderedDict
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not self.ctx.model]
        return [p for p in self.ctx.model.parameters() if p.requires_grad]

    def extra_bytes_sent(self) -> int:
        """Bytes DeepSpeed's own collectives sent from this rank since the last call (counted in the inner
        Communicator, so also part of its bytes: this is their share)."""
        total = deepspeed_bytes(self.inner.stats)
        out, self._ds_counted = total - self._ds_counted, total
        return out

    def optimizer_state_bytes(self) -> int:
        """This rank's optimizer state (its partition of it with ZeRO >= 1)."""
        return state_bytes(self.ctx.optimizer)

    def master_bytes(self) -> int:
        """DeepSpeed's fp32 master partition (ZeRO >= 1 keeps one, even when the model is fp32)."""
        return sum(s.master.numel() * s.master.element_size() for s in self.owned) if self.stage else 0

    def param_bytes(self) -> int:
        """The working parameters this rank holds between steps: its partitions under ZeRO-3 (none
        gathered), else the whole module in its dtype."""
        params = list(self.ctx.model.parameters())
        if self.stage == 3:
            return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        return sum(p.numel() * p.element_size() for p in params)

    def state_dict(self) -> dict[str, Any]:
        """ZeRO-3 (the module holds empty placeholders) and mixed precision (the module holds a rounded
        copy): this rank's fp32 partitions; else nothing (the module's parameters are the master)."""
        if self.stage == 3 or (self.stage and self.dtype != torch.float32):
            return {"fp32": [s.master.detach().clone() for s in self.owned]}
        return {}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        opt = self.engine.optimizer
        for i, shard in enumerate(self.owned):
            if self.stage == 3:
                shard.master.copy_(state["fp32"][i])
                opt.fp16_partitioned_groups_flat[i].copy_(shard.master)
            elif "fp32" in state:  # mixed precision: the fp32 partition; the module holds its rounding
                shard.master.copy_(state["fp32"][i])
                opt.parallel_partitioned_bit16_groups[i][self.inner.rank].copy_(shard.master)
            elif self.stage in (1, 2):  # the worker loaded the module: its partition is the master
                shard.master.copy_(opt.parallel_partitioned_bit16_groups[i][self.inner.rank])
