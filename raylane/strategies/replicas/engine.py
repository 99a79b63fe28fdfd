"""The inner engine of a multi-rank replica: how the R ranks of one replica train one model together.

An engine owns the replica's inner step and says which slice of the model's fp32 master parameters
this rank owns (`owned`: one `OwnedShard` per parameter group; the R ranks' shards tile the model).
Outer strategies (replica_diloco, hsdp) work on those shards only, and call `publish()` after they
changed them, which makes the replica's working copy consistent again (an inner all-gather).

- `TorchEngine`: inner ddp with replicated optimizer state. The parameters are views into one flat
  buffer (padded to a multiple of R); rank s owns the s-th of R equal slices. Inner collectives go
  through the `inner` Communicator (counted as comm/inner/...).
- `DeepSpeedEngine` (deepspeed.py, which imports this module, never the other way):
  `deepspeed.initialize` over the replica, ZeRO 0-3. hsdp.py's `build_engine` picks one.

`train_step(batch, lr, outer)`: forward, backward, gradient sync, optimizer step. With `outer` (a
Communicator across replicas) the gradient is also averaged across replicas, shard by shard (HSDP):
inner reduce-scatter, outer all-reduce of the owned shard, inner all-gather.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from raylane.comm import Communicator
from raylane.strategies.base import WorkerContext
from raylane.strategies.ddp import clip_and_step

ENGINES = ("torch", "deepspeed")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class OwnedShard:
    """This rank's slice [start, start + numel) of a parameter group's flat fp32 master vector.
    `flat`: the group's full flat working parameters when this rank holds them (None: ZeRO-3)."""

    master: torch.Tensor
    start: int
    flat: torch.Tensor | None


def flat_offsets(flat: torch.Tensor, params: list[torch.Tensor]) -> dict[int, tuple[int, int]]:
    """id(param) -> (offset, numel) in `flat`, for the params whose storage lies in `flat`."""
    out, base, esize = {}, flat.data_ptr(), flat.element_size()
    for p in params:
        off = (p.data.data_ptr() - base) // esize
        if p.numel() and 0 <= off and off + p.numel() <= flat.numel():
            out[id(p)] = (off, p.numel())
    return out


def owned_pieces(shard: OwnedShard, named: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.Tensor]]:
    """(name, view of `shard.master`) for each of `named` that overlaps this rank's slice."""
    assert shard.flat is not None, "owned_pieces needs the flat working parameters"
    offsets = flat_offsets(shard.flat, [p for _, p in named])
    lo, hi, out = shard.start, shard.start + shard.master.numel(), []
    for name, p in named:
        if id(p) not in offsets:
            continue
        off, n = offsets[id(p)]
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            out.append((f"{name}[{a - off}:{b - off}]", shard.master[a - lo:b - lo]))
    return out


def padded(n: int, ranks: int) -> int:
    return -(-n // ranks) * ranks


def hsdp_average(grad: torch.Tensor, inner: Communicator, outer: Communicator | None) -> None:
    """Average the flat (padded) gradient `grad` in place over the replica, and across replicas
    when `outer` is given (reduce-scatter inside, all-reduce of the owned chunk across, all-gather)."""
    if outer is None or outer.world_size == 1:
        inner.allreduce(grad, op="avg")
        return
    chunk = inner.reduce_scatter(grad, op="avg")
    outer.allreduce(chunk, op="avg")
    grad.copy_(torch.cat(inner.allgather(chunk)))


class TorchEngine:
    """Inner ddp over the `inner` Communicator; parameters live in one flat padded buffer."""

    name = "torch"

    def __init__(self, ctx: WorkerContext, inner: Communicator):
        self.ctx, self.inner = ctx, inner
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in self.params)
        p0 = self.params[0]
        self.flat = torch.zeros(padded(n, inner.world_size), dtype=p0.dtype, device=p0.device)
        self.grad = torch.zeros_like(self.flat)
        off = 0
        with torch.no_grad():
            for p in self.params:
                self.flat[off:off + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[off:off + p.numel()].view_as(p)
                off += p.numel()
        self._index()

    def _index(self) -> None:
        size = self.flat.numel() // self.inner.world_size
        start = self.inner.rank * size
        self.owned = [OwnedShard(self.flat[start:start + size], start, self.flat)]

    def train_step(self, batch: Any, lr: float, outer: Communicator | None = None) -> tuple[float, float]:
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=False)
        loss = ctx.loss(batch)
        loss.backward()
        off = 0
        for p in self.params:
            n = p.numel()
            self.grad[off:off + n].copy_(p.grad.reshape(-1) if p.grad is not None else torch.zeros(n))
            off += n
        hsdp_average(self.grad, self.inner, outer)
        off = 0
        for p in self.params:
            p.grad = self.grad[off:off + p.numel()].view_as(p).clone()
            off += p.numel()
        return loss.item(), clip_and_step(ctx, lr)

    @torch.no_grad()
    def publish(self) -> None:
        """After the owned shard changed: every rank of the replica gets every shard."""
        shard = self.owned[0]
        self.flat.copy_(torch.cat(self.inner.allgather(shard.master.clone())))

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # every rank holds the whole model

    def release(self) -> None:
        pass  # nothing is ever gathered

    def set_comm(self, inner: Communicator, store: Any) -> None:
        assert inner.world_size * self.owned[0].master.numel() == self.flat.numel(), \
            "the replica's size changed: recovery keeps replicas whole (layout.unit = ranks_per_replica)"
        self.inner = inner
        self._index()

    def extra_bytes_sent(self) -> int:
        return 0  # everything went through the Communicators

    def optimizer_state_bytes(self) -> int:
        return state_bytes(self.ctx.optimizer)

    def master_bytes(self) -> int:
        return 0  # the model's own parameters are the master

    def param_bytes(self) -> int:
        """The working parameters this rank holds (the whole replicated model)."""
        return self.flat.numel() * self.flat.element_size()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # the worker loaded the model and the optimizer: the flat buffer is the model


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state (exp_avg, momentum buffers, ...)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)
