"""DeepSpeed inside a replica: `deepspeed.initialize` over the replica's R ranks, ZeRO stage 0-3.

DeepSpeed needs the torch.distributed *default* group; each rank belongs to one replica, so the
default group is the replica's inner group, formed per generation under the store prefix
`gen<n>/deepspeed/<replica>` (`join_default_group`). After a fault (`set_comm`) the old engine is
destroyed (its gradient hooks removed), DeepSpeed's cached groups are released
(`deepspeed.comm.destroy_process_group`) and a fresh engine is built over the new generation; each
rank keeps its own parameters (not the initial broadcast from local rank 0, which may be a fresh
replacement) and its optimizer state. ZeRO-3: the module's partitioned parameters are replaced by
plain ones of their full shape (zeros: no rank holds the whole model, and the lost rank's
partitions are gone) and DeepSpeed's module attributes are dropped (`_unpartition`); the new engine
partitions them afresh (same shapes and replica size: the same partition per rank, module and
parameter ids numbered as in a fresh process) and each rank writes back its own fp32 partition; a
replacement gets its partition from a peer replica (hsdp) or the checkpoint, via `load_state_dict`.
DeepSpeed's ZeRO-3 state (partitions, `state_dict`) holds tensors only: nothing is unpickled.

The optimizer is the worker's torch optimizer (`optimizer=`: no DeepSpeed CPU-Adam build needed);
ZeRO 1-3 re-point its param groups at this rank's fp32 partitions, so `optimizer.state_dict()`
is this rank's shard of the optimizer state (tensors only; ZeRO-3 empties the groups inside its
step, so between steps the engine puts the partitions back: `_at_rest`). The lr is set on it every step;
`optim.grad_clip` becomes DeepSpeed's `gradient_clipping` (the norm of the replica's gradient).
With an `outer` Communicator (hsdp), an optimizer pre-step hook averages the gradient of each
partition across replicas: DeepSpeed has reduced it inside the replica just before.

Bytes: DeepSpeed's own collectives do not go through a raylane Communicator. DeepSpeed's comms
logger records each op's message size; `extra_bytes_sent()` turns them into the bytes this rank
sends with the ring formulas (all_reduce 2(R-1)/R x size, all_gather (R-1) x chunk, reduce_scatter
(R-1)/R x size, broadcast (R-1)/R x size averaged over the ranks). They are reported apart, as
`comm/inner/deepspeed_bytes_sent` (an estimate from message sizes, not counted on the wire).
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
from raylane.strategies.replica_engine import OwnedShard, padded, state_bytes

_RING = {"all_reduce": lambda s, n: 2 * (n - 1) * s / n, "all_reduce_coalesced": lambda s, n: 2 * (n - 1) * s / n,
         "all_gather_into_tensor": lambda s, n: (n - 1) * s, "all_gather": lambda s, n: (n - 1) * s,
         "reduce_scatter_tensor": lambda s, n: (n - 1) * s / n, "reduce_scatter": lambda s, n: (n - 1) * s,
         "broadcast": lambda s, n: (n - 1) * s / n, "reduce": lambda s, n: (n - 1) * s / n}


def _import_deepspeed(device: torch.device) -> Any:
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # one device per Ray actor: its device 0
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op; skip its JIT build
    return deepspeed


def join_default_group(store: StoreAddress, replica: int, rank: int, size: int) -> None:
    """(Re-)form the default group as this replica's generation `store.generation`."""
    from deepspeed.comm import comm as ds_comm

    if dist.is_initialized():  # through DeepSpeed, which then drops its cached groups of the old generation
        ds_comm.destroy_process_group() if ds_comm.cdb is not None else dist.destroy_process_group()
    timeout = datetime.timedelta(seconds=store.timeout_s)
    client = dist.TCPStore(store.host, store.port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"gen{store.generation}/deepspeed/{replica}", client)
    dist.init_process_group(store.backend, store=prefixed, rank=rank, world_size=size, timeout=timeout)


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

    def __init__(self, ctx: WorkerContext, inner: Communicator, zero_stage: int, replica: int):
        self.ctx, self.inner, self.stage, self.replica = ctx, inner, zero_stage, replica
        device = next(ctx.model.parameters()).device
        self.ds = _import_deepspeed(device)
        self.outer: Communicator | None = None
        ctx.optimizer.register_step_pre_hook(self._average_across_replicas)
        if zero_stage == 0:
            self._flatten()
        # ZeRO-3 adds attributes to every module; `_unpartition` drops them before a rebuild
        self._plain_attrs = [(m, set(m.__dict__)) for m in ctx.model.modules()]
        join_default_group(ctx.store, replica, inner.rank, inner.world_size)
        self._build()

    # -- engine -----------------------------------------------------------------------
    def _flatten(self) -> None:
        """ZeRO-0 keeps the module's parameters: make them views into one flat padded buffer."""
        params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        self.flat = torch.zeros(padded(n, self.inner.world_size), dtype=params[0].dtype, device=params[0].device)
        off = 0
        with torch.no_grad():
            for p in params:
                self.flat[off:off + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[off:off + p.numel()].view_as(p)
                off += p.numel()

    def _config(self) -> dict[str, Any]:
        bs = self.ctx.batch(0)[1].shape[0] if self.ctx.batch is not None else 1
        return {"train_micro_batch_size_per_gpu": bs, "gradient_accumulation_steps": 1,
                "gradient_clipping": float(self.ctx.grad_clip), "zero_allow_untested_optimizer": True,
                # ZeRO-3: partition every parameter (no unpartitioned "persistent" small ones), so that
                # the fp32 partition is the whole truth that `publish` writes back
                "zero_optimization": {"stage": self.stage, "stage3_param_persistence_threshold": 0},
                "steps_per_print": 2**62,
                "comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False}}

    def _build(self) -> None:
        if self.stage == 3:
            _restart_zero3_ids()
        self.engine, *_ = self.ds.initialize(model=self.ctx.model, optimizer=self.ctx.optimizer,
                                             config=self._config(), dist_init_required=False)
        self._index()
        self._at_rest()
        self._ds_log().comms_dict.clear()  # the initial broadcast of the model is not a step's traffic

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

    def _ds_log(self) -> Any:
        from deepspeed.comm.comm import comms_logger

        return comms_logger

    # -- a step -----------------------------------------------------------------------
    def _average_across_replicas(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.outer is None or self.outer.world_size == 1:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.outer.allreduce(p.grad, op="avg")

    def train_step(self, batch: Any, lr: float, outer: Communicator | None = None) -> tuple[float, float]:
        for group in self.ctx.optimizer.param_groups:
            group["lr"] = lr
        self.outer = outer
        if self.stage == 3:  # its step fills the groups one sub-group at a time
            self.engine.optimizer._clear_fp32_optimizer_param_groups()
        try:
            loss = self.ctx.loss(batch)
            self.engine.backward(loss)
            self.engine.step()
        finally:
            self.outer = None
            self._at_rest()
        norm = self.engine.get_global_grad_norm()
        return loss.item(), float(norm) if norm is not None else float("nan")

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
        """Bytes DeepSpeed's own collectives sent from this rank since the last call (estimated)."""
        log, n = self._ds_log(), self.inner.world_size
        total = sum(_RING.get(op.split("|")[0], lambda s, n: 0)(size, n) * rec[0]
                    for op, sizes in log.comms_dict.items() for size, rec in sizes.items())
        log.comms_dict.clear()
        return int(total)

    def optimizer_state_bytes(self) -> int:
        """This rank's optimizer state (its partition of it with ZeRO >= 1)."""
        return state_bytes(self.ctx.optimizer)

    def master_bytes(self) -> int:
        """DeepSpeed's fp32 master partition (ZeRO >= 1 keeps one, even when the model is fp32)."""
        return sum(s.master.numel() * s.master.element_size() for s in self.owned) if self.stage else 0

    def state_dict(self) -> dict[str, Any]:
        if self.stage == 3:  # the module's parameters are empty placeholders: keep the partition
            return {"fp32": [s.master.detach().clone() for s in self.owned]}
        return {}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        opt = self.engine.optimizer
        for i, shard in enumerate(self.owned):
            if self.stage == 3:
                shard.master.copy_(state["fp32"][i])
                opt.fp16_partitioned_groups_flat[i].copy_(shard.master)
            elif self.stage in (1, 2):  # the worker loaded the module: its partition is the master
                shard.master.copy_(opt.parallel_partitioned_bit16_groups[i][self.inner.rank])
