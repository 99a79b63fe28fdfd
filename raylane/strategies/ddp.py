"""ddp: synchronous data parallel with bucketed gradient allreduce, overlapped with backward.

Parameters are grouped, in reverse registration order (roughly the order backward
produces their gradients), into buckets of at most `bucket_mb` MB. A bucket's allreduce
starts (async) as soon as the last of its gradients is accumulated, while backward goes
on; after backward every bucket is waited for, averaged and copied back. Then the
global grad norm is clipped and the optimizer steps: every replica applies the same
update, so replicas stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raylane.strategies.base import WorkerContext, WorkerStrategy, register
from raylane.validation import check


@dataclass
class DDPConfig:
    name: str = "ddp"
    bucket_mb: float = 25.0

    def validate(self, prefix: str) -> None:
        check(self.bucket_mb > 0, f"{prefix}.bucket_mb", self.bucket_mb, "must be > 0")


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                                  device=params[0].device)
        self.pending = 0
        self.handle = None


class DDPWorker(WorkerStrategy):
    replicas_identical = True

    def __init__(self, cfg: DDPConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.buckets = self._make_buckets(int(cfg.bucket_mb * 2**20))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for p in self._params():
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.ctx.model.parameters() if p.requires_grad]

    def _make_buckets(self, cap_bytes: int) -> list[_Bucket]:
        return group_buckets(self._params(), cap_bytes)

    def _on_grad_ready(self, p: torch.nn.Parameter) -> None:
        bucket = self._bucket_of[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        offset = 0
        for p in bucket.params:
            n = p.numel()
            if p.grad is None:
                bucket.buffer[offset:offset + n].zero_()
            else:
                bucket.buffer[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        bucket.handle = self._reduce(bucket)

    def _reduce(self, bucket: _Bucket) -> Any:
        """Start averaging `bucket.buffer` over the ranks (in place); returns a handle to wait on.
        Subclasses (lgreco) send it compressed."""
        return self.ctx.comm.allreduce(bucket.buffer, op="avg", async_op=True)

    def _reduced(self, bucket: _Bucket, result: Any) -> None:
        """After the bucket's handle returned `result`; `bucket.buffer` must then hold the average."""

    def sync_gradients(self, backward: callable) -> None:
        """Run `backward()` with bucket allreduces overlapped; leaves averaged grads in .grad."""
        for b in self.buckets:
            b.pending, b.handle = len(b.params), None
        backward()
        for b in self.buckets:
            if b.handle is None:  # some parameter got no gradient this step
                self._launch(b)
        for b in self.buckets:
            self._reduced(b, b.handle.wait())
            offset = 0
            for p in b.params:
                n = p.numel()
                grad = b.buffer[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
                offset += n

    def train_step(self, batch, lr: float) -> dict[str, float]:
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=False)
        loss = ctx.loss(batch)
        self.sync_gradients(loss.backward)
        grad_norm = clip_and_step(ctx, lr)
        return {"loss": loss.item(), "grad_norm": grad_norm}


def group_buckets(params: list[torch.nn.Parameter], cap_bytes: int) -> list[_Bucket]:
    """Buckets of at most `cap_bytes` (one dtype each), in reverse order of `params`."""
    buckets, current, size = [], [], 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > cap_bytes or p.dtype != current[0].dtype):
            buckets.append(_Bucket(current))
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(_Bucket(current))
    return buckets


def clip_and_step(ctx: WorkerContext, lr: float) -> float:
    """Clip the global grad norm (if configured), set the lr, step the optimizer."""
    params = [p for p in ctx.model.parameters() if p.grad is not None]
    max_norm = ctx.grad_clip if ctx.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    ctx.optimizer.step()
    return float(norm)


register("ddp", DDPConfig, DDPWorker)
