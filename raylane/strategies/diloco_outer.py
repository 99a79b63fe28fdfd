"""DiLoCo's outer state: global parameters per fragment, the outer optimizer, syncs in flight.

Per fragment p, on every rank in the same order:
1. `start(p, step, merge_step)`: the outer gradient global_p - local_p (flat, fp32) starts its
   compressed all-reduce (mean; reduced in fp32 by `quantized_allreduce`) asynchronously;
2. `finish(sync)` after `merge_step`: waits for it, steps the outer optimizer (SGD with
   Nesterov momentum, identical on every rank) on global_p, then merges
   local_p = alpha * local_p + (1 - alpha) * global_p.
Global parameters start as the model's (every replica starts alike) and stay bit-identical
across ranks, because every rank decompresses the same gathered payloads.

`state_dict()` waits for the syncs in flight and keeps their reduced outer gradients, so a
restored run merges the same values at the same steps. After the group is re-formed
(`set_comm`) the syncs in flight on the old group are lost; finishing one raises: restore a
checkpoint (recovery does so for strategies whose replicas differ). A compressor that cannot
run (inf or nan outer gradient) raises from `finish`; nothing is sent in full precision instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from raylane.comm import (CollectiveHandle, CompressionConfig, Communicator, Compressor, compressed_allgather,
                          expected_bytes_sent, quantized_allreduce)


@dataclass
class Fragment:
    index: int
    names: list[str]
    local: list[torch.nn.Parameter]  # the model's own parameters
    global_: list[torch.Tensor]  # the outer (global) parameters

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.local)


@dataclass
class Sync:
    fragment: int
    start_step: int
    merge_step: int
    outer_grad: torch.Tensor  # flat fp32: this rank's before the all-reduce, the mean after
    bytes_sent: int
    handle: CollectiveHandle | None = None  # None once waited for (or restored)
    lost: bool = False


class OuterSync:
    def __init__(self, parts: list[list[tuple[str, torch.nn.Parameter]]], cfg: Any, compressor: Compressor,
                 comm: Communicator):
        self.fragments = [Fragment(i, [n for n, _ in part], [p for _, p in part],
                                   [p.detach().clone() for _, p in part]) for i, part in enumerate(parts)]
        self.alpha, self.compressor, self.comm = cfg.merge_alpha, compressor, comm
        self.optimizer = torch.optim.SGD([{"params": f.global_} for f in self.fragments], lr=cfg.outer_lr,
                                         momentum=cfg.outer_momentum,
                                         nesterov=cfg.outer_nesterov and cfg.outer_momentum > 0)
        self.in_flight: list[Sync] = []
        self._eval_identity = CompressionConfig("none").build()

    # -- syncs ------------------------------------------------------------------------
    def bytes_per_sync(self, fragment: int) -> int:
        """Payload bytes this rank sends for one sync of `fragment` (the compressor's formula)."""
        return expected_bytes_sent("quantized_allreduce", self.fragments[fragment].numel, torch.float32,
                                   self.comm.world_size, self.comm.rank, self.compressor, self.comm.backend)

    @torch.no_grad()
    def start(self, fragment: int, step: int, merge_step: int) -> Sync:
        frag = self.fragments[fragment]
        assert all(s.fragment != fragment for s in self.in_flight), f"fragment {fragment} is already in flight"
        if frag.numel == 0:  # a shard of a multi-rank replica may hold none of it: so do its outer peers
            sync = Sync(fragment, step, merge_step, torch.zeros(0), 0)
            self.in_flight.append(sync)
            return sync
        delta = torch.cat([(g.float() - p.float()).reshape(-1) for p, g in zip(frag.local, frag.global_)])
        sync = Sync(fragment, step, merge_step, delta, self.bytes_per_sync(fragment))
        sync.handle = quantized_allreduce(self.comm, delta, self.compressor, op="avg",
                                          key=f"diloco/fragment{fragment}", async_op=True)
        self.in_flight.append(sync)
        return sync

    def due(self, step: int) -> list[Sync]:
        return [s for s in self.in_flight if s.merge_step <= step]

    def resolve(self, sync: Sync) -> None:
        """Wait for `sync`'s all-reduce; afterwards `outer_grad` holds the mean."""
        if sync.lost:
            raise RuntimeError(f"diloco: the outer sync of fragment {sync.fragment} started at step "
                               f"{sync.start_step} was lost when the process group was re-formed; restore a "
                               "checkpoint")
        if sync.handle is not None:
            sync.handle.wait()
            sync.handle = None

    @torch.no_grad()
    def finish(self, sync: Sync) -> float:
        """Outer step and merge of `sync`'s fragment; returns the norm of the mean outer gradient."""
        self.resolve(sync)
        self.in_flight.remove(sync)
        frag = self.fragments[sync.fragment]
        if not frag.global_:
            return 0.0
        for g, d in zip(frag.global_, torch.split(sync.outer_grad, [g.numel() for g in frag.global_])):
            g.grad = d.view_as(g).to(g.dtype)
        self.optimizer.step()
        for g, p in zip(frag.global_, frag.local):
            g.grad = None
            if self.alpha == 0:
                p.copy_(g)
            else:
                p.mul_(self.alpha).add_(g.to(p.dtype), alpha=1 - self.alpha)
        return float(sync.outer_grad.norm())

    def set_comm(self, comm: Communicator) -> None:
        self.comm = comm
        for sync in self.in_flight:
            sync.lost, sync.handle = True, None

    # -- measures and views -----------------------------------------------------------
    @torch.no_grad()
    def drift(self) -> float:
        """Norm of local - global over every parameter of this replica."""
        sq = [(p.float() - g.float()).pow(2).sum() for f in self.fragments for p, g in zip(f.local, f.global_)]
        return float(torch.stack(sq).sum().sqrt())

    @contextlib.contextmanager
    def swapped(self, view: str) -> Iterator[None]:
        """The model holds the `view` parameters ("global" or "replica_avg") for the duration."""
        params = [p for f in self.fragments for p in f.local]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            if view == "global":
                sources = [g for f in self.fragments for g in f.global_]
            else:
                assert view == "replica_avg", view
                flat = torch.cat([p.detach().float().reshape(-1) for p in params])
                compressed_allgather(self.comm, flat, self._eval_identity, op="avg", key="diloco/eval")
                sources = list(torch.split(flat, [p.numel() for p in params]))
            for p, s in zip(params, sources):
                p.copy_(s.view_as(p))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        for sync in self.in_flight:
            self.resolve(sync)
        return {"fragments": [f.names for f in self.fragments],
                "global": [[g.detach().clone() for g in f.global_] for f in self.fragments],
                "optimizer": self.optimizer.state_dict(),
                "in_flight": [{"fragment": s.fragment, "start_step": s.start_step, "merge_step": s.merge_step,
                               "outer_grad": s.outer_grad.clone(), "bytes_sent": s.bytes_sent}
                              for s in self.in_flight],
                "compressor": self.compressor.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [f.names for f in self.fragments]
        if state["fragments"] != names:
            raise ValueError(f"diloco: the checkpoint's fragments {state['fragments']} differ from this run's "
                             f"{names}; resume with the same strategy.fragments and fragment_pattern")
        for f, saved in zip(self.fragments, state["global"]):
            for g, s in zip(f.global_, saved):
                g.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
        device = self.fragments[0].global_[0].device
        self.in_flight = [Sync(s["fragment"], s["start_step"], s["merge_step"], s["outer_grad"].to(device).clone(),
                               s["bytes_sent"]) for s in state["in_flight"]]
        self.compressor.load_state_dict(state["compressor"])
