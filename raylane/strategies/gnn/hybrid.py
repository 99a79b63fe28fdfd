"""The hybrid's halo exchange: per chunk and per layer, between the D ways (graph parts) of a stage.

All ways of a stage cut their parts into the same number of chunks and run them in the same order
(one shared seed), so at chunk position i every way computes its own chunk `order[i]` at level k
together. `WayPlan` (built once per way) says, per chunk index c and way q, which of this way's
rows q's chunk c reads (`send[c][q]`) and how many rows this way's chunk c reads from q
(`recv_counts[c][q]`, grouped by owner as `Subgraph.halo` is).

`HaloRows` (autograd): forward sends the rows each other way reads from this way's level-k table
(which holds this epoch's rows for chunks already computed, the current chunk included, and last
epoch's for the rest) with one alltoall of the stage group; backward sends the gradients of the
received rows back to their owners with one alltoall, where the owner routes each row's gradient
by the row's chunk, exactly as it does for its own halo rows:
- the current chunk (same position, computed together): into the autograd graph of this chunk;
- a chunk already computed this epoch (fresh): into `pending[k]`, consumed when that chunk's
  backward runs (later, in reverse order), so no gradient is lost;
- a chunk not yet computed (a historical row, last epoch's value): into `carry[k]` for the next
  epoch's backward with `stale_gradients`, else dropped (the stale-row convention).
With one chunk every row is the current chunk's: the hybrid's loss and gradient equal the
single-process model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raylane.strategies.gnn.partition import subgraph


@dataclass
class SendSpec:
    """The rows one other way reads from this way for one chunk index: own-row slots, the chunk each
    row is in, and (for rows of the chunk itself) their positions among the chunk's vertices."""

    slots: torch.Tensor
    chunk: torch.Tensor
    live: torch.Tensor     # bool: row is in the chunk computed at this position
    live_pos: torch.Tensor  # positions among the chunk's vertices (rows with live=True)


class WayPlan:
    def __init__(self, way: int, ways_chunks: list[list[torch.Tensor]], edge_index: torch.Tensor, n: int,
                 owner: torch.Tensor, slot_of: Any):
        d, c_count = len(ways_chunks), len(ways_chunks[way])
        assert all(len(chunks) == c_count for chunks in ways_chunks), "every way needs the same chunk count"
        chunk_any = torch.full((n,), -1, dtype=torch.long)
        for chunks in ways_chunks:
            for c, ids in enumerate(chunks):
                chunk_any[ids] = c
        self.way, self.ways = way, d
        self.recv_counts: list[list[int]] = []
        self.recv_chunk: list[torch.Tensor] = []  # owner's chunk of each received row (staleness)
        self.send: list[list[SendSpec | None]] = []
        for c in range(c_count):
            halos = [subgraph(ways_chunks[q][c], edge_index, None, n, owner).halo for q in range(d)]
            mine = halos[way]
            other = mine[owner[mine] != way]
            self.recv_counts.append([int((owner[mine] == q).sum()) if q != way else 0 for q in range(d)])
            self.recv_chunk.append(chunk_any[other])
            pos = torch.full((n,), -1, dtype=torch.long)
            pos[ways_chunks[way][c]] = torch.arange(len(ways_chunks[way][c]))
            specs: list[SendSpec | None] = []
            for q in range(d):
                if q == way:
                    specs.append(None)
                    continue
                ids = halos[q][owner[halos[q]] == way]
                live = pos[ids] >= 0
                specs.append(SendSpec(slot_of(ids), chunk_any[ids], live, pos[ids[live]]))
            self.send.append(specs)

    def rows_before(self, c: int) -> int:
        """Received rows owned by ways before this one (they precede the own halo rows)."""
        return sum(self.recv_counts[c][:self.way])


class Exchange:
    """One stage's exchange state: the plan, the stage group and the engine's tables / gradient sinks."""

    def __init__(self, plan: WayPlan, comm: Any):
        self.plan, self.comm = plan, comm

    def forward_rows(self, table: torch.Tensor, c: int) -> torch.Tensor:
        """The rows this way's chunk c reads from the other ways (level-k tables), grouped by owner."""
        sends = [table[s.slots] if s is not None else table[:0] for s in self.plan.send[c]]
        width = table.shape[1]
        got = self.comm.alltoall(sends, [torch.Size((k, width)) for k in self.plan.recv_counts[c]])
        return torch.cat([g for g in got if len(g)] or [table.new_zeros(0, width)])

    def backward_rows(self, grad: torch.Tensor, c: int, n_chunk: int, pos: torch.Tensor,
                      pending: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
        """Return the received rows' gradients to their owners; route what comes back (see the module
        docstring); the result is the gradient of this way's current-chunk rows."""
        width = grad.shape[1]
        back = [b.contiguous() for b in torch.split(grad, self.plan.recv_counts[c])]
        shapes = [torch.Size((len(s.slots) if s is not None else 0, width)) for s in self.plan.send[c]]
        got = self.comm.alltoall(back, shapes)
        out = grad.new_zeros(n_chunk, width)
        for spec, g in zip(self.plan.send[c], got):
            if spec is None or not len(g):
                continue
            out.index_add_(0, spec.live_pos, g[spec.live])
            rest = ~spec.live
            fresh = rest & (pos[spec.chunk.clamp(min=0)] < pos[c])
            pending.index_add_(0, spec.slots[fresh], g[fresh])
            stale = rest & ~fresh
            if carry is not None and bool(stale.any()):
                carry.index_add_(0, spec.slots[stale], g[stale])
        return out


class HaloRows(torch.autograd.Function):
    """rows = the other ways' halo rows for chunk c at level k (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, ex: Exchange, table: torch.Tensor, c: int,  # type: ignore[override]
                sinks: tuple) -> torch.Tensor:
        ctx.ex, ctx.c, ctx.n, ctx.sinks = ex, c, h.shape[0], sinks
        return ex.forward_rows(table, c)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        pos, pending, carry = ctx.sinks
        return ctx.ex.backward_rows(grad.contiguous(), ctx.c, ctx.n, pos, pending, carry), None, None, None, None
