"""The GNNPipe pipeline engine: one stage's epoch of chunked, pipelined full-graph training.

A stage holds layers [a, b) of the GNN (`model`, a part from the GNN family: embed / conv /
classify / prepare_edges) and computes them for every vertex of its graph part (the whole graph,
or in the hybrid one way's part), chunk by chunk:

  forward, chunks in the epoch's order: receive the chunk's input from the previous stage (the
    first stage embeds the features of the chunk and of its halo), then per layer k: write the
    chunk's level-k rows into the historical table T_k, read its own-part halo rows from T_k
    (rows of chunks already computed this epoch are fresh and get gradients; rows of chunks not
    yet computed are historical: last epoch's values), in the hybrid receive the other ways' halo
    rows for this chunk and level (strategies/gnn/hybrid.py, the same fresh/historical rule), compute the
    layer; send the output on (the last stage adds the chunk's loss).
  backward, chunks in reverse order: receive the gradient of the chunk's output (the last stage
    starts from its loss), backpropagate it together with the gradients that later chunks (of
    every way) left on this chunk's rows (`pending`), add this chunk's fresh-halo gradients to
    `pending` (other ways' rows: sent back to their owners), send the input's gradient back.
    In reverse order a chunk's rows have all their gradient before it is drained, so with one
    chunk (no staleness) the gradients equal the whole-graph model's exactly.

Historical rows' gradients go to `carry` (applied in the next epoch) with `stale_gradients`,
else are dropped. Tables, stamps and gradient sinks hold the stage's own rows only (the part's
vertices, indexed by `slot_of`), not the whole graph: other parts' rows are exchanged per chunk.
Sends are asynchronous (a stage goes on with the next chunk); the caller steps once per epoch.
GCNII's initial representation x0 travels with the activations (the boundary carries 2 x width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from raylane.strategies.gnn.hybrid import Exchange, HaloRows
from raylane.strategies.gnn.partition import Subgraph, subgraph


@dataclass
class Peers:
    """Global ranks of the previous / next stage of this way (None at the ends)."""

    prev: int | None
    next: int | None


@dataclass
class _Chunk:
    sg: Subgraph
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None
    levels: dict[int, torch.Tensor] = field(default_factory=dict)
    halos: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _Rows:
    """Static per-chunk indices into the stage's own rows."""

    slots: torch.Tensor       # slots of the chunk's vertices
    halo_slots: torch.Tensor  # slots of the own-part halo rows
    halo_chunk: torch.Tensor  # their chunks
    before: int               # received (other ways') halo rows that precede the own ones


class StageEngine:
    """One stage of one way. `chunks`: this way's part cut into chunks (global ids); `owner`: the
    way of every vertex (all zeros without the hybrid); `exchange`: the hybrid's, else None."""

    def __init__(self, model: Any, graph: Any, comm: Any, peers: Peers, chunks: list[torch.Tensor],
                 owner: torch.Tensor, way: int, loss_scale: float, exchange: Exchange | None = None,
                 stale_gradients: bool = False):
        self.model, self.graph, self.comm, self.peers = model, graph, comm, peers
        self.n, self.way, self.loss_scale, self.exchange = graph.num_vertices, way, loss_scale, exchange
        self.a, self.b = model.range
        self.width = model.width
        self.boundary = 2 * self.width if model.carries_x0 else self.width
        self.mine = torch.cat(chunks)
        self.own = torch.sort(self.mine).values  # slot i holds vertex own[i]
        ei, w = model.prepare_edges(graph.edge_index, self.n)
        self.chunks = [subgraph(c, ei, w, self.n, owner) for c in chunks]
        chunk_of = torch.full((len(self.own),), -1, dtype=torch.long)
        for i, c in enumerate(chunks):
            chunk_of[self.slot_of(c)] = i
        self.rows = [self._rows(sg, owner, chunk_of, i) for i, sg in enumerate(self.chunks)]
        self.tables = {k: torch.zeros(len(self.own), self.width) for k in self._table_levels()}
        self.stamps = {k: torch.zeros(len(self.own), dtype=torch.long) for k in self.tables}
        self.epoch, self.sends = 0, []
        self.stale_gradients = stale_gradients
        self.carry: dict[int, torch.Tensor] = {}
        self.sent = {"next": 0, "prev": 0}  # bytes sent down / up the pipeline (training)
        self.stats: dict[str, float] = {}

    def slot_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Own-row slots of vertices of this part."""
        return torch.searchsorted(self.own, ids)

    def _rows(self, sg: Subgraph, owner: torch.Tensor, chunk_of: torch.Tensor, c: int) -> _Rows:
        ours = owner[sg.halo] == self.way
        slots = self.slot_of(sg.halo[ours])
        before = int((owner[sg.halo] < self.way).sum())
        return _Rows(self.slot_of(sg.vertices), slots, chunk_of[slots], before)

    def _table_levels(self) -> range:
        return range(max(self.a, 1), self.b)  # level 0 (the embedding) is computed, never historical

    # -- forward ------------------------------------------------------------------------------
    def _input(self, ch: _Chunk, c: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(level-a rows of the chunk, x0 rows, level-0 halo rows if embedded here)."""
        sg = ch.sg
        if self.model.first:
            h0 = self.model.embed(self.graph.x[sg.sources()])
            return h0[:sg.n], h0[:sg.n], h0[sg.n:]
        buf = torch.empty(sg.n, self.boundary)
        self.comm.recv(buf, self.peers.prev, tag=c)
        ch.inp = buf.requires_grad_(grad)
        h = ch.inp[:, :self.width]
        return h, (ch.inp[:, self.width:] if self.model.carries_x0 else None), None

    def _halo(self, ch: _Chunk, c: int, k: int, h: torch.Tensor, pos: torch.Tensor, grad: bool) -> torch.Tensor:
        """The chunk's level-k halo rows in `Subgraph.halo` order: other ways' (exchanged) around
        the own part's (from the table; fresh or historical by chunk position)."""
        rows, table = self.rows[c], self.tables[k]
        table[rows.slots] = h.detach()
        self.stamps[k][rows.slots] = self.epoch
        own = table[rows.halo_slots].requires_grad_(grad)
        fresh = pos[rows.halo_chunk] < pos[c]
        self._count_staleness(self.epoch - self.stamps[k][rows.halo_slots[~fresh]])
        ch.halos[k] = (own, fresh)
        if self.exchange is None:
            return own
        if grad:
            sinks = (pos, self.pending[k], self.carry_next.get(k))
            other = HaloRows.apply(h, self.exchange, table, c, sinks)
        else:
            other = self.exchange.forward_rows(table, c)
        stale = pos[self.exchange.plan.recv_chunk[c].clamp(min=0)] > pos[c]
        self._count_staleness(torch.ones(int(stale.sum()), dtype=torch.long))
        return torch.cat([other[:rows.before], own, other[rows.before:]])

    def _forward_chunk(self, c: int, pos: torch.Tensor, grad: bool) -> torch.Tensor:
        """Every layer of the stage for chunk c; returns the last level's rows (the last stage) or
        sends them on (and returns them)."""
        ch = self.records[c] = _Chunk(self.chunks[c])
        sg = ch.sg
        h, x0, halo0 = self._input(ch, c, grad)
        for j, k in enumerate(range(self.a, self.b)):
            ch.levels[k] = h
            halo = halo0 if k == 0 else self._halo(ch, c, k, h, pos, grad)
            h = self.model.conv(j, torch.cat([h, halo]), x0, sg.edge_index, sg.edge_weight, sg.n)
        if self.model.last:
            return h
        ch.out = torch.cat([h, x0], 1) if self.model.carries_x0 else h
        self._send(ch.out.detach().contiguous(), "next", c)
        return h

    def _loss(self, c: int, h: torch.Tensor) -> torch.Tensor:
        ch = self.records[c]
        mask = self.graph.train_mask[ch.sg.vertices]
        logits = self.model.classify(h[mask])
        ch.out = F.cross_entropy(logits, self.graph.y[ch.sg.vertices][mask], reduction="sum") * self.loss_scale
        return ch.out

    def _count_staleness(self, ages: torch.Tensor) -> None:
        s = self.stats
        s["reads"] = s.get("reads", 0) + len(ages)
        s["age_sum"] = s.get("age_sum", 0) + float(ages.sum())

    # -- backward -----------------------------------------------------------------------------
    def _backward_chunk(self, c: int, n_chunks: int) -> None:
        ch, rows = self.records.pop(c), self.rows[c]
        if self.model.last:
            roots, grads = [ch.out], [torch.ones(())]
        else:
            g = torch.empty(ch.sg.n, self.boundary)
            self.comm.recv(g, self.peers.next, tag=n_chunks + c)
            roots, grads = [ch.out], [g]
        for k, level in ch.levels.items():
            if k in self.pending:
                gk = self.pending[k][rows.slots]
                if bool(gk.any()):
                    roots.append(level)
                    grads.append(gk)
        torch.autograd.backward(roots, grads)
        for k, (halo, fresh) in ch.halos.items():
            if halo.grad is None:
                continue
            if bool(fresh.any()):
                self.pending[k].index_add_(0, rows.halo_slots[fresh], halo.grad[fresh])
            if self.stale_gradients and bool((~fresh).any()):
                self.carry_next[k].index_add_(0, rows.halo_slots[~fresh], halo.grad[~fresh])
        if ch.inp is not None:
            grad_in = ch.inp.grad if ch.inp.grad is not None else torch.zeros_like(ch.inp)
            self._send(grad_in.contiguous(), "prev", n_chunks + c)

    def _send(self, t: torch.Tensor, to: str, tag: int) -> None:
        self.sends.append(self.comm.send(t, getattr(self.peers, to), tag=tag, async_op=True))
        self.sent[to] += t.numel() * t.element_size()

    def _positions(self, order: list[int]) -> torch.Tensor:
        pos = torch.empty(len(self.chunks), dtype=torch.long)
        pos[torch.tensor(order)] = torch.arange(len(order))
        return pos

    # -- one epoch ----------------------------------------------------------------------------
    def train_epoch(self, order: list[int], epoch: int) -> dict[str, float]:
        """Epoch `epoch` (1-based): forward and backward of every chunk in `order`; leaves the
        gradients in .grad. Returns this stage's loss (last stage; else 0) and staleness statistics."""
        self.epoch = epoch
        self.stats, self.records, self.sends = {}, {}, []
        pos = self._positions(order)
        zeros = lambda: {k: torch.zeros(len(self.own), self.width) for k in self._table_levels()}  # noqa: E731
        self.pending = self.carry if self.carry else zeros()
        self.carry_next = zeros() if self.stale_gradients else {}
        loss = 0.0
        for c in order:
            h = self._forward_chunk(c, pos, grad=True)
            if self.model.last:
                loss += self._loss(c, h).item()
        for c in reversed(order):
            self._backward_chunk(c, len(self.chunks))
        self.carry, self.pending = self.carry_next, {}
        for handle in self.sends:
            handle.wait()
        self.sends = []
        reads = self.stats.get("reads", 0)
        return {"loss": loss, "stale_reads": reads, "staleness_epochs": self.stats.get("age_sum", 0) / max(1, reads)}

    @torch.no_grad()
    def infer(self, masks: dict[str, torch.Tensor]) -> dict[str, tuple[float, int, int]]:
        """Exact inference when this engine has one chunk (the caller's: other ways' rows exchanged
        per level): per mask name, (loss sum, correct, vertices) on the last stage, zeros elsewhere.
        Writes the tables (an inference engine keeps its own)."""
        assert len(self.chunks) == 1, "inference runs the part as one chunk"
        self.records, self.sends, self.stats = {}, [], {}
        h = self._forward_chunk(0, torch.zeros(1, dtype=torch.long), grad=False)
        for handle in self.sends:
            handle.wait()
        self.sends, self.records = [], {}
        if not self.model.last:
            return {name: (0.0, 0, 0) for name in masks}
        sg = self.chunks[0]
        logits = self.model.classify(h)
        out = {}
        for name, mask in masks.items():
            m = mask[sg.vertices]
            y = self.graph.y[sg.vertices][m]
            out[name] = (float(F.cross_entropy(logits[m], y, reduction="sum")) if m.any() else 0.0,
                         int((logits[m].argmax(-1) == y).sum()), int(m.sum()))
        return out
