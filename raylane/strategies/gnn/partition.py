"""Vertex partitions and the subgraphs full-graph GNN strategies compute on.

`partition(edge_index, n, parts, method)`: `metis` (default) cuts the graph with METIS (pymetis,
k-way, minimising the edge cut; seeded, so deterministic), `rcm` is the fallback without METIS:
scipy's reverse Cuthill-McKee order cut into `parts` contiguous blocks of equal size (on a
near-expander it cuts almost as many edges as a random split). `partition_stats` gives the
fraction of (undirected) edges cut and the halo rows (sources outside a part that its in-edges
read), which the strategies report as run metrics.

`Subgraph(vertices, ...)`: what one layer needs to compute `vertices` (the destinations): their
in-edges, with sources renumbered into a table whose first rows are the destinations themselves
and whose remaining rows are the halo (sources outside the set), sorted by owner then id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


PARTITIONERS = ("metis", "rcm")


def partition(edge_index: torch.Tensor, num_nodes: int, parts: int, method: str = "metis") -> torch.Tensor:
    """Part id (0..parts-1) of every vertex: METIS k-way parts, or equal contiguous blocks of the RCM order."""
    if parts == 1:
        return torch.zeros(num_nodes, dtype=torch.long)
    if method == "rcm":
        return locality_rank(edge_index, num_nodes) * parts // num_nodes
    assert method == "metis", method
    return _metis(edge_index, num_nodes, parts)


def _metis(edge_index: torch.Tensor, num_nodes: int, parts: int) -> torch.Tensor:
    import pymetis

    ei = edge_index[:, edge_index[0] != edge_index[1]]
    order = torch.argsort(ei[0] * num_nodes + ei[1])
    src, dst = ei[0, order], ei[1, order]
    xadj = torch.zeros(num_nodes + 1, dtype=torch.long)
    xadj[1:] = torch.cumsum(torch.bincount(src, minlength=num_nodes), 0)
    adjacency = pymetis.CSRAdjacency(xadj.numpy(), dst.numpy())
    _, membership = pymetis.part_graph(parts, adjacency, options=pymetis.Options(seed=0))
    owner = torch.tensor(membership, dtype=torch.long)
    assert len(owner) == num_nodes and int(owner.max()) < parts
    return owner


def partition_stats(edge_index: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """`edge_cut_fraction`: edges whose ends lie in different parts; `halo_rows`: sum over parts of
    the distinct outside sources its in-edges read (the rows a graph-parallel layer exchanges)."""
    ei = edge_index[:, edge_index[0] != edge_index[1]]
    cut = owner[ei[0]] != owner[ei[1]]
    n = len(owner)
    halo = torch.unique(owner[ei[1, cut]] * n + ei[0, cut])
    return {"edge_cut_fraction": float(cut.float().mean()) if ei.shape[1] else 0.0, "halo_rows": len(halo)}


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
