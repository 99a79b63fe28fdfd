"""Vertex partitions and the subgraphs full-graph GNN strategies compute on.

`partition(edge_index, n, parts)`: no METIS-like partitioner installs without compiled extras
(PyG's `ClusterData` needs torch-sparse/pyg-lib with METIS), so the heuristic is bandwidth
reduction: scipy's reverse Cuthill-McKee order (a BFS order, low degree first, that keeps
neighbours at nearby positions) cut into `parts` contiguous blocks of equal size. Neighbours
thus tend to share a block; deterministic for a given graph.

`Subgraph(vertices, ...)`: what one layer needs to compute `vertices` (the destinations): their
in-edges, with sources renumbered into a table whose first rows are the destinations themselves
and whose remaining rows are the halo (sources outside the set), sorted by owner then id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def partition(edge_index: torch.Tensor, num_nodes: int, parts: int) -> torch.Tensor:
    """Part id (0..parts-1) of every vertex: equal contiguous blocks of the RCM order."""
    if parts == 1:
        return torch.zeros(num_nodes, dtype=torch.long)
    return locality_rank(edge_index, num_nodes) * parts // num_nodes


def split_blocks(vertices: torch.Tensor, owner_order: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """`vertices` cut into `blocks` contiguous runs of their position in `owner_order` (a rank of each
    vertex in the locality order): the chunks of one part."""
    ranked = vertices[torch.argsort(owner_order[vertices])]
    return [c for c in torch.tensor_split(ranked, blocks)]


def locality_rank(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Position of each vertex in the RCM order (finer than `partition`, for chunking a part)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    ei = edge_index.numpy()
    adj = sp.csr_matrix((np.ones(ei.shape[1], dtype=np.int8), (ei[0], ei[1])), shape=(num_nodes, num_nodes))
    order = torch.from_numpy(reverse_cuthill_mckee(adj, symmetric_mode=True).astype(np.int64))
    rank = torch.empty(num_nodes, dtype=torch.long)
    rank[order] = torch.arange(num_nodes)
    return rank


@dataclass
class Subgraph:
    """Layer inputs for destinations `vertices`: source table = [vertices; halo]."""

    vertices: torch.Tensor          # (n,) global ids of the destinations
    halo: torch.Tensor              # (h,) global ids of the other sources, sorted by (owner, id)
    edge_index: torch.Tensor        # (2, e) local: row 0 indexes the source table, row 1 the destinations
    edge_weight: torch.Tensor | None

    @property
    def n(self) -> int:
        return len(self.vertices)

    def sources(self) -> torch.Tensor:
        return torch.cat([self.vertices, self.halo])


def subgraph(vertices: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None,
             num_nodes: int, owner: torch.Tensor | None = None) -> Subgraph:
    """The in-edges of `vertices` (edges: row 0 source, row 1 destination), renumbered."""
    local = torch.full((num_nodes,), -1, dtype=torch.long)
    local[vertices] = torch.arange(len(vertices))
    keep = local[edge_index[1]] >= 0
    src, dst = edge_index[0, keep], local[edge_index[1, keep]]
    weight = edge_weight[keep] if edge_weight is not None else None
    outside = local[src] < 0
    halo = torch.unique(src[outside])
    if owner is not None and len(halo):
        halo = halo[torch.argsort(owner[halo] * num_nodes + halo)]
    local[halo] = len(vertices) + torch.arange(len(halo))
    ei = torch.stack([local[src], dst])
    return Subgraph(vertices, halo, ei, weight)
