"""The GNNPipe pipeline engine: one stage's epoch of chunked, pipelined full-graph training.

A stage holds layers [a, b) of the GNN (`model`, a part from the GNN family: embed / conv /
classify / prepare_edges) and computes them for every vertex of its graph part, chunk by chunk:

  forward, chunks in the epoch's order: receive the chunk's input from the previous stage (the
    first stage embeds the features of the chunk and of its halo), then per layer k: write the
    chunk's level-k rows into the historical table T_k, read its halo rows from T_k (rows of
    chunks already computed this epoch are fresh and get gradients; rows of chunks not yet
    computed, or of other ways' parts in the hybrid, are historical: values of an earlier epoch,
    no gradient), compute the layer; send the output on (the last stage adds the chunk's loss).
  backward, chunks in reverse order: receive the gradient of the chunk's output (the last stage
    starts from its loss), backpropagate it together with the gradients that later chunks left
    on this chunk's rows (`G_k`), add this chunk's fresh-halo gradients to `G_k`, send the input's
    gradient back. In reverse order a chunk's rows have all their gradient before it is drained,
    so with one chunk (no staleness) the gradients equal the whole-graph model's exactly.

Sends are asynchronous (a stage goes on with the next chunk); the caller steps once per epoch.
GCNII's initial representation x0 travels with the activations (the boundary carries 2 x width).
Stage-to-stage traffic uses `comm.send/recv` (counted); the hybrid's stage group refreshes the
other ways' halo rows once per epoch (`exchange`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from raylane.strategies.gnn_partition import Subgraph, subgraph


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


class StageEngine:
    def __init__(self, model: Any, graph: Any, comm: Any, peers: Peers, chunks: list[torch.Tensor],
                 owner: torch.Tensor, way: int, loss_scale: float,
                 exchange: Callable[[int, torch.Tensor], None] | None = None, stale_gradients: bool = False):
        self.model, self.graph, self.comm, self.peers = model, graph, comm, peers
        self.n, self.way, self.loss_scale, self.exchange = graph.num_vertices, way, loss_scale, exchange
        self.a, self.b = model.range
        self.width = model.width
        self.boundary = 2 * self.width if model.carries_x0 else self.width
        ei, w = model.prepare_edges(graph.edge_index, self.n)
        self.chunks = [subgraph(c, ei, w, self.n, owner) for c in chunks]
        self.chunk_of = torch.full((self.n,), -1, dtype=torch.long)  # -1: another way's vertex
        for i, c in enumerate(chunks):
            self.chunk_of[c] = i
        self.mine = torch.cat(chunks)
        self.tables = {k: torch.zeros(self.n, self.width) for k in self._table_levels()}
        self.stamps = {k: torch.zeros(self.n, dtype=torch.long) for k in self.tables}
        self.epoch, self.sends = 0, []
        # stale_gradients: the gradients historical rows of this part received, applied to their
        # chunks in the next epoch's backward (else dropped)
        self.stale_gradients = stale_gradients
        self.carry: dict[int, torch.Tensor] = {}
        self.sent = {"next": 0, "prev": 0}  # bytes sent down / up the pipeline (training)
        self.stats: dict[str, float] = {}

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

    def _forward_chunk(self, c: int, pos: torch.Tensor, grad: bool) -> torch.Tensor | None:
        ch = self.records[c] = _Chunk(self.chunks[c])
        sg = ch.sg
        h, x0, halo0 = self._input(ch, c, grad)
        for j, k in enumerate(range(self.a, self.b)):
            ch.levels[k] = h
            if k == 0:
                x_src = torch.cat([h, halo0])
            else:
                self.tables[k][sg.vertices] = h.detach()
                self.stamps[k][sg.vertices] = self.epoch
                halo = self.tables[k][sg.halo].requires_grad_(grad)
                fresh = pos[self.chunk_of[sg.halo]] < pos[c] if len(sg.halo) else torch.zeros(0, dtype=torch.bool)
                fresh &= self.chunk_of[sg.halo] >= 0
                self._count_staleness(sg.halo[~fresh], k)
                ch.halos[k] = (halo, fresh)
                x_src = torch.cat([h, halo])
            h = self.model.conv(j, x_src, x0, sg.edge_index, sg.edge_weight, sg.n)
        if self.model.last:
            mask = self.graph.train_mask[sg.vertices]
            logits = self.model.classify(h[mask])
            ch.out = F.cross_entropy(logits, self.graph.y[sg.vertices][mask], reduction="sum") * self.loss_scale
            return ch.out
        ch.out = torch.cat([h, x0], 1) if self.model.carries_x0 else h
        self._send(ch.out.detach().contiguous(), "next", c)
        return None

    def _count_staleness(self, stale: torch.Tensor, k: int) -> None:
        s = self.stats
        s["reads"] = s.get("reads", 0) + len(stale)
        s["age_sum"] = s.get("age_sum", 0) + float((self.epoch - self.stamps[k][stale]).sum())

    # -- backward -----------------------------------------------------------------------------
    def _backward_chunk(self, c: int, pending: dict[int, torch.Tensor], n_chunks: int) -> None:
        ch = self.records.pop(c)
        sg = ch.sg
        if self.model.last:
            roots, grads = [ch.out], [torch.ones(())]
        else:
            g = torch.empty(sg.n, self.boundary)
            self.comm.recv(g, self.peers.next, tag=n_chunks + c)
            roots, grads = [ch.out], [g]
        for k, level in ch.levels.items():
            if k in pending:
                gk = pending[k][sg.vertices]
                if bool(gk.any()):
                    roots.append(level)
                    grads.append(gk)
        torch.autograd.backward(roots, grads)
        for k, (halo, fresh) in ch.halos.items():
            if halo.grad is None:
                continue
            if bool(fresh.any()):
                pending[k].index_add_(0, sg.halo[fresh], halo.grad[fresh])
            stale = ~fresh & (self.chunk_of[sg.halo] >= 0)
            if self.stale_gradients and bool(stale.any()):
                self.carry_next[k].index_add_(0, sg.halo[stale], halo.grad[stale])
        if ch.inp is not None:
            grad_in = ch.inp.grad if ch.inp.grad is not None else torch.zeros_like(ch.inp)
            self._send(grad_in.contiguous(), "prev", n_chunks + c)

    def _send(self, t: torch.Tensor, to: str, tag: int) -> None:
        self.sends.append(self.comm.send(t, getattr(self.peers, to), tag=tag, async_op=True))
        self.sent[to] += t.numel() * t.element_size()

    # -- one epoch ----------------------------------------------------------------------------
    def train_epoch(self, order: list[int], epoch: int) -> dict[str, float]:
        """Epoch `epoch` (1-based): forward and backward of every chunk in `order`; leaves the
        gradients in .grad. Returns this stage's loss (last stage; else 0) and staleness statistics."""
        self.epoch = epoch
        self.stats, self.records, self.sends = {}, {}, []
        pos = torch.empty(len(self.chunks), dtype=torch.long)
        pos[torch.tensor(order)] = torch.arange(len(order))
        loss = 0.0
        for c in order:
            out = self._forward_chunk(c, pos, grad=True)
            if out is not None:
                loss += out.item()
        zeros = lambda: {k: torch.zeros(self.n, self.width) for k in self._table_levels()}  # noqa: E731
        pending = self.carry if self.carry else zeros()
        self.carry_next = zeros() if self.stale_gradients else {}
        for c in reversed(order):
            self._backward_chunk(c, pending, len(self.chunks))
        self.carry = self.carry_next
        for h in self.sends:
            h.wait()
        self.sends = []
        if self.exchange is not None:  # hybrid: the other ways' halo rows, for the next epoch
            for k in self._table_levels():
                self.exchange(k, self.tables[k])
                self.stamps[k][self.chunk_of < 0] = self.epoch
        reads = self.stats.get("reads", 0)
        return {"loss": loss, "stale_reads": reads, "staleness_epochs": self.stats.get("age_sum", 0) / max(1, reads)}

    @torch.no_grad()
    def infer(self, masks: dict[str, torch.Tensor]) -> dict[str, tuple[float, int, int]]:
        """Exact inference of the whole part as one chunk (halo rows of other ways exchanged per
        level): per mask name, (loss sum, correct, vertices) on the last stage, zeros elsewhere."""
        ei, w = self.model.prepare_edges(self.graph.edge_index, self.n)
        sg = subgraph(self.mine, ei, w, self.n, None)
        ch = _Chunk(sg)
        h, x0, halo0 = self._input(ch, 0, grad=False)
        table = torch.zeros(self.n, self.width)
        for j, k in enumerate(range(self.a, self.b)):
            if k == 0:
                x_src = torch.cat([h, halo0])
            else:
                table[sg.vertices] = h
                if self.exchange is not None:
                    self.exchange(k, table)
                x_src = torch.cat([h, table[sg.halo]])
            h = self.model.conv(j, x_src, x0, sg.edge_index, sg.edge_weight, sg.n)
        if not self.model.last:
            self.comm.send(torch.cat([h, x0], 1) if self.model.carries_x0 else h.contiguous(), self.peers.next, tag=0)
            return {name: (0.0, 0, 0) for name in masks}
        logits = self.model.classify(h)
        out = {}
        for name, mask in masks.items():
            m = mask[sg.vertices]
            y = self.graph.y[sg.vertices][m]
            out[name] = (float(F.cross_entropy(logits[m], y, reduction="sum")) if m.any() else 0.0,
                         int((logits[m].argmax(-1) == y).sum()), int(m.sum()))
        return out
