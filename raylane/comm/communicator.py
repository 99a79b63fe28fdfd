"""Communicator: every byte between workers goes through here, and is counted.

It wraps one torch.distributed ProcessGroup object (built without the global default
group, so that it can be thrown away and re-formed when members die). Each collective
is sync (returns its result) or async (`async_op=True` returns a `Handle`; `wait()`
returns the result). Bytes are counted when the call is issued, from the backend's
algorithm (`raylane.comm.wire`), per op and per run.

An optional `Link` emulates a thin network: `wait()` does not return before the
counted bytes could have crossed a link of that bandwidth and latency. Ops in flight at once
share the one link: each one's transfer starts when the previous one's ends.

On failure (a peer died, the collective timed out) the underlying Work raises; the
Communicator does not retry: the caller re-forms the group.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from raylane.comm import wire
from raylane.comm.workspace import Workspace


@dataclass(frozen=True)
class Link:
    """An emulated link: bandwidth in Gbit/s (0 = unlimited) and latency per message."""

    bandwidth_gbps: float = 0.0
    latency_s: float = 0.0

    def delay_s(self, traffic: wire.Traffic) -> float:
        transfer = traffic.bytes_sent * 8 / (self.bandwidth_gbps * 1e9) if self.bandwidth_gbps > 0 else 0.0
        return transfer + self.latency_s * traffic.messages_sent


@dataclass
class OpStats:
    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    messages_sent: int = 0
    messages_recv: int = 0


@dataclass
class CommStats:
    """Counters per op name; `total()` sums them."""

    ops: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    wait_s: float = 0.0

    def add(self, op: str, traffic: wire.Traffic) -> None:
        s = self.ops[op]
        s.calls += 1
        s.bytes_sent += traffic.bytes_sent
        s.bytes_recv += traffic.bytes_recv
        s.messages_sent += traffic.messages_sent
        s.messages_recv += traffic.messages_recv

    def total(self) -> OpStats:
        t = OpStats()
        for s in self.ops.values():
            for k in vars(t):
                setattr(t, k, getattr(t, k) + getattr(s, k))
        return t

    def as_dict(self) -> dict[str, Any]:
        t = self.total()
        return {"bytes_sent": t.bytes_sent, "bytes_recv": t.bytes_recv, "calls": t.calls,
                "comm_wait_s": self.wait_s,
                "ops": {k: vars(v).copy() for k, v in self.ops.items()}}


class Handle:
    """An in-flight collective. `wait()` blocks until it is done and returns its result."""

    def __init__(self, works: list, finish: Callable[[], Any], delay_s: float, stats: CommStats):
        self._works, self._finish, self._stats = works, finish, stats
        self._deadline = time.monotonic() + delay_s
        self._done, self._result = False, None

    def is_completed(self) -> bool:
        return self._done or (all(w.is_completed() for w in self._works) and time.monotonic() >= self._deadline)

    def wait(self) -> Any:
        if not self._done:
            t0 = time.monotonic()
            for w in self._works:
                w.wait()
            pause = self._deadline - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._result = self._finish()
            self._done = True
            self._stats.wait_s += time.monotonic() - t0
        return self._result


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}


class Communicator:
    """Collectives over one process group, with exact byte accounting."""

    def __init__(self, pg: Any, rank: int, world_size: int, backend: str = "gloo", link: Link | None = None):
        assert backend in ("gloo", "nccl"), backend
        self.pg, self.rank, self.world_size, self.backend = pg, rank, world_size, backend
        self.link = link or Link()
        self.stats = CommStats()
        # Fault-injection hooks (null by default): called with the op name before it is
        # issued, and on every tensor this rank sends (may return a replacement).
        self.before_op: Callable[[str], None] | None = None
        self.outgoing: Callable[[torch.Tensor], torch.Tensor] | None = None
        # This step's Byzantine ground truth and adversary (raylane.workers.chaos.ByzantineStep, set by
        # the worker's fault hooks; None without one): strategies that exchange gradients consult it.
        self.byzantine: Any = None
        self._handles: weakref.WeakSet[Handle] = weakref.WeakSet()
        self.workspace = Workspace()  # scratch of the compressed collectives, reused across calls
        self._link_free_at = 0.0  # monotonic time the emulated link finishes what was issued so far

    def _prepare(self, op: str, t: torch.Tensor) -> torch.Tensor:
        if self.before_op is not None:
            self.before_op(op)
        if self.outgoing is not None:
            t.copy_(self.outgoing(t))
        return t

    # -- bookkeeping -----------------------------------------------------------------
    def _issue(self, op: str, traffic: wire.Traffic, works: list, finish: Callable[[], Any],
               async_op: bool) -> Any:
        self.stats.add(op, traffic)
        delay = self.link.delay_s(traffic)
        if delay > 0:  # one link: queue behind the transfers still on it
            now = time.monotonic()
            self._link_free_at = max(now, self._link_free_at) + delay
            delay = self._link_free_at - now
        handle = Handle(works, finish, delay, self.stats)
        self._handles.add(handle)
        return handle if async_op else handle.wait()

    def _allreduce_traffic(self, t: torch.Tensor) -> wire.Traffic:
        nbytes = t.numel() * t.element_size()
        if self.backend == "gloo":
            return wire.gloo_allreduce(nbytes, t.element_size(), self.world_size, self.rank)
        return wire.ring_allreduce(nbytes, self.world_size)

    # -- collectives -----------------------------------------------------------------
    def allreduce(self, t: torch.Tensor, op: str = "sum", async_op: bool = False, label: str = "allreduce") -> Any:
        """In-place allreduce of `t`; op is sum | avg | max | min | product. Returns `t`.

        `label` names the op in `stats` (compound collectives count their parts under their own names).
        """
        if op not in _REDUCE_OPS:
            raise ValueError(f"allreduce op={op!r}: choose one of {sorted(_REDUCE_OPS)}")
        opts = dist.AllreduceOptions()
        opts.reduceOp = _REDUCE_OPS[op]
        self._prepare("allreduce", t)
        works = [self.pg.allreduce([t], opts)] if self.world_size > 1 else []

        def finish() -> torch.Tensor:
            if op == "avg":
                t.div_(self.world_size)
            return t
        return self._issue(label, self._allreduce_traffic(t), works, finish, async_op)

    def allgather(self, t: torch.Tensor, async_op: bool = False, label: str = "allgather") -> Any:
        """Every rank's `t` (same shape everywhere), as a list indexed by rank."""
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._prepare("allgather", t)
        works = [self.pg.allgather([out], [t])] if self.world_size > 1 else []
        if self.world_size == 1:
            out[0].copy_(t)
        traffic = wire.allgather(t.numel() * t.element_size(), self.world_size)
        return self._issue(label, traffic, works, lambda: out, async_op)

    def alltoall(self, chunks: list[torch.Tensor], recv_shapes: list[torch.Size] | None = None,
                 async_op: bool = False, label: str = "alltoall") -> Any:
        """Send chunks[j] to rank j; returns the list of chunks received, indexed by sender.

        All chunks share a dtype; by default every received chunk has this rank's own shape.
        """
        assert len(chunks) == self.world_size
        shapes = recv_shapes or [chunks[self.rank].shape] * self.world_size
        dtype, device = chunks[0].dtype, chunks[0].device
        received = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
        if self.world_size == 1:
            received[0].copy_(chunks[0])
            works = []
        else:
            flat_in = self._prepare("alltoall", torch.cat([c.reshape(-1) for c in chunks]))
            flat_out = torch.empty(sum(r.numel() for r in received), dtype=dtype, device=device)
            works = [self.pg.alltoall_base(flat_out, flat_in, [r.numel() for r in received],
                                           [c.numel() for c in chunks], dist.AllToAllOptions())]
        esize = chunks[0].element_size()
        traffic = wire.alltoall([c.numel() * esize for c in chunks], [r.numel() * esize for r in received],
                                self.rank)

        def finish() -> list[torch.Tensor]:
            if works:
                offset = 0
                for r in received:
                    r.copy_(flat_out[offset:offset + r.numel()].view(r.shape))
                    offset += r.numel()
            return received
        return self._issue(label, traffic, works, finish, async_op)

    def alltoall_into(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor,
                      recv_counts: list[int], async_op: bool = False, label: str = "alltoall") -> Any:
        """Flat alltoall: the j-th run of `send_counts[j]` elements of `send` goes to rank j; rank j's run
        lands at the j-th run of `recv_counts` in `recv`. No concatenation, no copy-out; counted
        like `alltoall` with the same chunk sizes. Returns `recv`."""
        assert len(send_counts) == len(recv_counts) == self.world_size
        if self.world_size == 1:
            recv[:recv_counts[0]].copy_(send[:send_counts[0]])
            works = []
        else:
            self._prepare("alltoall", send)
            works = [self.pg.alltoall_base(recv, send, list(recv_counts), list(send_counts), dist.AllToAllOptions())]
        esize = send.element_size()
        traffic = wire.alltoall([n * esize for n in send_counts], [n * esize for n in recv_counts], self.rank)
        return self._issue(label, traffic, works, lambda: recv, async_op)

    def reduce_scatter(self, t: torch.Tensor, op: str = "sum", async_op: bool = False) -> Any:
        """Reduce the flattened `t` across ranks and return this rank's chunk.

        Chunks are `torch.tensor_split(t.flatten(), W)`. Built on alltoall (each rank sends
        W-1 chunks), because Gloo's own reduce_scatter allreduces the whole buffer.
        """
        if op not in ("sum", "avg"):
            raise ValueError(f"reduce_scatter op={op!r}: choose one of ['avg', 'sum']")
        chunks = list(torch.tensor_split(t.reshape(-1), self.world_size))
        shapes = [chunks[self.rank].shape] * self.world_size
        handle = self.alltoall(chunks, shapes, async_op=True)
        self.stats.ops["reduce_scatter"].calls += 1

        def finish() -> torch.Tensor:
            parts = handle.wait()
            acc = torch.stack(parts).sum(0, dtype=torch.float32).to(t.dtype) if t.is_floating_point() \
                else torch.stack(parts).sum(0)
            return acc.div_(self.world_size) if op == "avg" else acc
        return Handle([], finish, 0.0, self.stats) if async_op else finish()

    def broadcast(self, t: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """In-place broadcast of `t` from rank `src`. Returns `t`."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        if self.rank == src:
            self._prepare("broadcast", t)
        works = [self.pg.broadcast([t], opts)] if self.world_size > 1 else []
        nbytes = t.numel() * t.element_size()
        model = wire.gloo_broadcast if self.backend == "gloo" else wire.chain_broadcast
        traffic = model(nbytes, self.world_size, self.rank, src) if self.world_size > 1 else wire.Traffic(0, 0)
        return self._issue("broadcast", traffic, works, lambda: t, async_op)

    def send(self, t: torch.Tensor, dst: int, tag: int = 0, async_op: bool = False) -> Any:
        nbytes = t.numel() * t.element_size()
        self._prepare("send", t)
        return self._issue("send", wire.Traffic(nbytes, 0, 1, 0), [self.pg.send([t], dst, tag)],
                           lambda: t, async_op)

    def recv(self, t: torch.Tensor, src: int, tag: int = 0, async_op: bool = False) -> Any:
        nbytes = t.numel() * t.element_size()
        return self._issue("recv", wire.Traffic(0, nbytes, 0, 1), [self.pg.recv([t], src, tag)],
                           lambda: t, async_op)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.pg.barrier().wait()

    def abort(self) -> None:
        """Drop the process group and every pending op on it. Destroying the group closes its
        connections, so peers blocked on this rank fail at once instead of at their timeout.
        The Communicator is unusable after."""
        for handle in list(self._handles):
            handle._works = []
        self.pg = None
        gc.collect()
