"""graph_parallel: full-graph GNN training by graph partition (the baseline gnnpipe is measured against).

The vertices are cut into W parts (gnn_partition.partition: METIS, or `partitioner: rcm` blocks;
run metrics `graph/edge_cut_fraction`, `graph/halo_rows`); every rank holds the whole model
and computes every layer for its part. Before each layer after the first, a rank sends the rows
of its vertices that other parts' in-edges read (their halo) with one alltoall, and the backward
pass sends the halo rows' gradients back to their owners (`HaloExchange`, an autograd function).
The first layer's halo needs no exchange: features are static, so each rank embeds its halo's
features itself (as a real deployment would cache them once). The loss of the part (scaled by 1
/ train vertices of the graph) is backpropagated, the gradients are summed with one allreduce,
and every rank steps identically. With the same seed the result equals the whole-graph model.

Bytes per epoch and rank: 2 (L - 1) x (halo rows sent) x width x 4 for the exchanges plus the
gradient allreduce (GCNII's x0 is the rank's own embedding and is never exchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from raylane.strategies.gnn import common
from raylane.strategies.base import WorkerContext, WorkerStrategy, register
from raylane.strategies.gnn.partition import partition, partition_stats, subgraph


@dataclass
class GraphParallelConfig:
    name: str = "graph_parallel"
    partitioner: str = "metis"  # metis | rcm (reverse Cuthill-McKee blocks)
    best_val_every: int = 1            # evaluate every N epochs for test accuracy at the best validation (0: off)
    patience: int = 0                  # stop after N evaluations without a better validation accuracy (0: never)

    def validate(self, prefix: str) -> None:
        common.check_graph_options(self, prefix)

    def check_run(self, run: Any) -> None:
        common.check_graph_run(run, "graph_parallel")


class HaloPlan:
    """Which rows go where: `send_local[q]` (positions among this rank's vertices) to rank q;
    the halo rows arrive grouped by owner in the order of `Subgraph.halo`."""

    def __init__(self, comm: Any, owner: torch.Tensor, halos: list[torch.Tensor], vertices: torch.Tensor, n: int):
        me = comm.rank
        local = torch.full((n,), -1, dtype=torch.long)
        local[vertices] = torch.arange(len(vertices))
        self.comm = comm
        self.send_local = [local[halos[q][owner[halos[q]] == me]] if q != me else local[:0] for q in range(len(halos))]
        self.recv_counts = [int((owner[halos[me]] == q).sum()) if q != me else 0 for q in range(len(halos))]
        self.n_local = len(vertices)

    def rows_sent(self) -> int:
        return sum(len(s) for s in self.send_local)

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        width = h.shape[1]
        got = self.comm.alltoall([h[idx] for idx in self.send_local],
                                 [torch.Size((c, width)) for c in self.recv_counts])
        return torch.cat([g for g in got if len(g)] or [h.new_zeros(0, width)])

    def scatter_grad(self, grad: torch.Tensor) -> torch.Tensor:
        width = grad.shape[1]
        back = list(torch.split(grad, self.recv_counts))
        got = self.comm.alltoall([b.contiguous() for b in back],
                                 [torch.Size((len(idx), width)) for idx in self.send_local])
        out = grad.new_zeros(self.n_local, width)
        for idx, g in zip(self.send_local, got):
            if len(idx):
                out.index_add_(0, idx, g)
        return out


class HaloExchange(torch.autograd.Function):
    """halo rows = exchange(own rows); backward returns the halo gradients to their owners."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, plan: HaloPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        return plan.gather(h.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.plan.scatter_grad(grad.contiguous()), None


class GraphParallelWorker(WorkerStrategy):
    replicas_identical = True
    full_graph = True  # trains a GNN on ctx.data, a whole graph (config.validate checks the pairing)
    eval_views = ("model", "test")  # model: validation vertices; test: test vertices

    def __init__(self, cfg: GraphParallelConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self._plan_for(ctx.world_size)

    def _plan_for(self, world: int) -> None:
        g, model = self.ctx.data, self.ctx.model
        self.world = world
        ei, w = model.prepare_edges(g.edge_index, g.num_vertices)
        owner = partition(g.edge_index, g.num_vertices, world, self.cfg.partitioner)
        self.partition_metrics = {f"graph/{k}": v for k, v in partition_stats(g.edge_index, owner).items()}
        parts = [torch.nonzero(owner == q).flatten() for q in range(world)]
        subs = [subgraph(p, ei, w, g.num_vertices, owner) for p in parts]
        self.sg = subs[self.ctx.rank]
        self.plan = HaloPlan(self.ctx.comm, owner, [s.halo for s in subs], self.sg.vertices, g.num_vertices)

    def set_comm(self, comm: Any) -> None:
        super().set_comm(comm)
        if comm.world_size != self.world:  # the world shrank: partition again
            self._plan_for(comm.world_size)
        self.plan.comm = comm

    def make_batch(self, sample_offset: int) -> None:
        return None  # the whole graph: ctx.data

    def _forward(self) -> torch.Tensor:
        """This part's output embeddings (every layer, halos exchanged)."""
        g, model, sg = self.ctx.data, self.ctx.model, self.sg
        h0 = model.embed(g.x[sg.sources()])
        h, x0 = h0[:sg.n], h0[:sg.n]
        for j in range(len(model.convs)):
            halo = h0[sg.n:] if j == 0 else HaloExchange.apply(h, self.plan)
            h = model.conv(j, torch.cat([h, halo]), x0, sg.edge_index, sg.edge_weight, sg.n)
        return h

    def train_step(self, batch: Any, lr: float) -> dict[str, float]:
        ctx, g = self.ctx, self.ctx.data
        ctx.optimizer.zero_grad(set_to_none=True)
        mask = g.train_mask[self.sg.vertices]
        logits = ctx.model.classify(self._forward()[mask])
        loss = F.cross_entropy(logits, g.y[self.sg.vertices][mask], reduction="sum") / max(1, int(g.train_mask.sum()))
        loss.backward()
        common.allreduce_grads(ctx, ctx.comm)
        norm = common.step_optimizer(ctx, lr)
        train = int(mask.sum())
        return {"loss": loss.item(), "loss_part": loss.item(), "samples": train, "tokens": train, "grad_norm": norm,
                "halo_rows": self.plan.rows_sent(), **self.partition_metrics}

    def evaluate(self, num_shards: int) -> dict[str, tuple[float, int]]:
        g = self.ctx.data
        logits = self.ctx.model.classify(self._forward())
        parts = {}
        for name, mask in common.masks(g).items():
            m = mask[self.sg.vertices]
            y = g.y[self.sg.vertices][m]
            parts[name] = (float(F.cross_entropy(logits[m], y, reduction="sum")) if m.any() else 0.0,
                           int((logits[m].argmax(-1) == y).sum()), int(m.sum()))
        return common.evaluation(parts)


register("graph_parallel", GraphParallelConfig, GraphParallelWorker, common.FullGraphDriver)
