"""The GNN family: deep GCN, GraphSAGE and GCNII (PyTorch Geometric layers), buildable by part.

`model.n_layer` message-passing layers of width `model.d_model`, between an input projection
(features -> width, ReLU) and a linear classifier; gcn and sage layers are residual
(h + ReLU(conv(h)), `model.gnn_residual`, as in ResGCN) so that deep stacks train.
`part={"layers": [a, b]}` builds only layers [a, b): the part with a = 0 also holds the input
projection, the part with b = n_layer the classifier. Every layer is initialised from its own seed, so the parts of a model equal the
layers of the whole model built with the same seed.

A stage computes one layer for a set of destination vertices from a source table whose first
rows are those vertices themselves (`conv(j, x_src, x0_dst, edge_index, edge_weight, n_dst)`):
the same call serves a whole graph (n_dst = N) and a chunk with its halo. GCNII also needs the
initial representation x0 of the destinations (`carries_x0`). `prepare_edges` gives the edge
list and weights the layers expect (GCN, GCNII: symmetric normalisation with self loops,
computed once on the whole graph; SAGE: mean over the raw in-edges).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from raylane.validation import check

GNN_MODELS = ("gcn", "sage", "gcnii")


class GNNStage(nn.Module):
    def __init__(self, kind: str, input_dim: int, num_classes: int, cfg: Any, seed: int, a: int, b: int):
        from torch_geometric.nn import GCN2Conv, GCNConv, SAGEConv

        super().__init__()
        self.kind, self.num_layers, self.range = kind, cfg.n_layer, (a, b)
        self.first, self.last, self.carries_x0 = a == 0, b == cfg.n_layer, kind == "gcnii"
        self.dropout = cfg.dropout
        self.residual = cfg.gnn_residual and kind != "gcnii"  # GCNII has its own initial residual
        self.width = width = cfg.d_model
        if self.first:
            torch.manual_seed(seed * 1009)
            self.input = nn.Linear(input_dim, width)
        convs = []
        for i in range(a, b):
            torch.manual_seed(seed * 1009 + 1 + i)
            if kind == "gcn":
                convs.append(GCNConv(width, width, normalize=False))
            elif kind == "sage":
                convs.append(SAGEConv(width, width))
            else:
                convs.append(GCN2Conv(width, cfg.gnn_alpha, cfg.gnn_theta, layer=i + 1, normalize=False))
        self.convs = nn.ModuleList(convs)
        if self.last:
            torch.manual_seed(seed * 1009 + 1 + cfg.n_layer)
            self.head = nn.Linear(width, num_classes)

    def prepare_edges(self, edge_index: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Edges (source row 0, destination row 1) and weights for the whole graph."""
        if self.kind == "sage":
            return edge_index, None
        from torch_geometric.nn.conv.gcn_conv import gcn_norm

        return gcn_norm(edge_index, None, num_nodes, add_self_loops=True)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input projection (first part only); dropout on the features and on the projection, as the
        GCN and GCNII papers drop the input."""
        x = F.dropout(x, self.dropout, self.training)
        return F.dropout(F.relu(self.input(x)), self.dropout, self.training)

    def conv(self, j: int, x_src: torch.Tensor, x0_dst: torch.Tensor | None, edge_index: torch.Tensor,
             edge_weight: torch.Tensor | None, n_dst: int) -> torch.Tensor:
        """This part's j-th layer for the first `n_dst` rows of `x_src` (edges index x_src rows)."""
        layer = self.convs[j]
        if self.kind == "sage":
            h = layer((x_src, x_src[:n_dst]), edge_index, size=(x_src.shape[0], n_dst))
        elif self.kind == "gcn":
            h = layer(x_src, edge_index, edge_weight)[:n_dst]
        else:  # GCN2Conv reads x0 for every source row; the halo rows' outputs are dropped
            pad = x0_dst.new_zeros(x_src.shape[0] - n_dst, x0_dst.shape[1])
            h = layer(x_src, torch.cat([x0_dst, pad]), edge_index, edge_weight)[:n_dst]
        h = F.dropout(F.relu(h), self.dropout, self.training)
        return x_src[:n_dst] + h if self.residual else h

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (last part only)."""
        return self.head(h)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """The whole model on a whole graph (a part with every layer): logits per vertex."""
        assert self.first and self.last, "forward needs the whole model; a part runs through a pipeline"
        ei, w = self.prepare_edges(edge_index, x.shape[0])
        h = x0 = self.embed(x)
        for j in range(len(self.convs)):
            h = self.conv(j, h, x0, ei, w, x.shape[0])
        return self.classify(h)


def build_gnn(cfg: Any, num_classes: int, input_dim: int, part: Any = None) -> GNNStage:
    """The model family's entry in `models.build_model` (which seeded torch with the run's seed)."""
    check(input_dim > 0, "model.name", cfg.name, "needs a graph dataset (data=csbm | karate | graph)")
    a, b = (0, cfg.n_layer) if part is None else tuple(part["layers"])
    assert 0 <= a < b <= cfg.n_layer, (part, cfg.n_layer)
    seed = int(torch.randint(2**20, (1,)))  # from the run's seed: equal in every process
    return GNNStage(cfg.name, input_dim, num_classes, cfg, seed, a, b)
