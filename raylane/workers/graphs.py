"""Graph datasets for full-graph GNN training (strategy=gnnpipe | graph_parallel).

Three sources, all giving a `Graph` (the worker's `ctx.data`):
- `csbm`: a contextual stochastic block model, seeded: `num_classes` communities, each vertex draws
  `avg_degree / 2` edge ends, a fraction `homophily` of them inside its community; features are the
  community's mean (unit norm) plus Gaussian noise of norm ~`feature_noise`. Thousands to millions of
  vertices in seconds.
- `karate`: Zachary's karate club as PyTorch Geometric ships it (inline in the package; nothing is
  downloaded): 34 vertices, 4 classes, its 4 labelled training vertices.
- `graph`: a folder at `data.path` with `edges.txt` (one `u v` pair per line, 0-based ids, `#` comments),
  `features.txt` (one row of floats per vertex) and `labels.txt` (one integer per vertex). A malformed
  file is a one-line ConfigError naming the file and line.

Edges are made undirected, without self loops, coalesced. Train/val/test masks split the vertices
with a fixed permutation (seed `graph.split_seed`), except karate's training vertices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from raylane.validation import ConfigError, check

GRAPH_DATASETS = ("csbm", "karate", "graph")


@dataclass
class GraphConfig:
    num_vertices: int = 2000           # csbm
    avg_degree: float = 8.0            # csbm: mean undirected degree
    homophily: float = 0.8             # csbm: fraction of edges inside a community
    feature_noise: float = 1.5         # csbm: noise norm against unit-norm community means
    train_fraction: float = 0.5
    val_fraction: float = 0.25         # the rest is the test split
    split_seed: int = 1234             # the split is fixed across runs

    def validate(self, prefix: str) -> None:
        check(self.num_vertices >= 4, f"{prefix}.num_vertices", self.num_vertices, "must be >= 4")
        check(self.avg_degree > 0, f"{prefix}.avg_degree", self.avg_degree, "must be > 0")
        check(0 <= self.homophily <= 1, f"{prefix}.homophily", self.homophily, "must be in [0, 1]")
        check(self.feature_noise >= 0, f"{prefix}.feature_noise", self.feature_noise, "must be >= 0")
        check(0 < self.train_fraction < 1, f"{prefix}.train_fraction", self.train_fraction, "must be in (0, 1)")
        check(0 < self.val_fraction and self.train_fraction + self.val_fraction < 1, f"{prefix}.val_fraction",
              self.val_fraction, f"must be > 0 with train_fraction + val_fraction < 1 (train {self.train_fraction})")


class Graph:
    """A whole graph: features `x` (N, F), labels `y` (N,), undirected `edge_index` (2, E), boolean
    masks `train_mask` / `val_mask` / `test_mask`. `vocab_size` = number of classes."""

    classification = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor, edge_index: torch.Tensor, num_classes: int,
                 masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

        self.x, self.y = x.float(), y.long()
        self.num_vertices = len(y)
        ei, _ = remove_self_loops(edge_index.long())
        self.edge_index = coalesce(to_undirected(ei, num_nodes=self.num_vertices), num_nodes=self.num_vertices)
        self.train_mask, self.val_mask, self.test_mask = masks
        self.vocab_size, self.input_dim = num_classes, x.shape[1]
        self.num_train = int(self.train_mask.sum())

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("a graph dataset trains on the whole graph (strategy=gnnpipe | graph_parallel); "
                        "it has no sample batches")

    eval_batch = train_batch


def split_masks(n: int, train_fraction: float, val_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = max(1, int(n * train_fraction)), max(1, int(n * val_fraction))
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    masks[0][perm[:n_train]] = True
    masks[1][perm[n_train:n_train + n_val]] = True
    masks[2][perm[n_train + n_val:]] = True
    return tuple(masks)


def csbm(cfg: GraphConfig, num_classes: int, input_dim: int, seed: int) -> Graph:
    """A contextual SBM graph (see the module docstring); the same seed gives the same graph."""
    g = torch.Generator().manual_seed(20_000 + seed)
    n, k = cfg.num_vertices, num_classes
    y = torch.randint(k, (n,), generator=g)
    m = max(1, int(n * cfg.avg_degree / 2))
    src = torch.randint(n, (m,), generator=g)
    order = torch.argsort(y)
    counts = torch.bincount(y, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    cls = y[src]
    pick = (torch.rand(m, generator=g) * counts[cls].clamp(min=1)).long()
    dst_in = order[(starts[cls] + pick).clamp(max=n - 1)]
    dst_any = torch.randint(n, (m,), generator=g)
    dst = torch.where(torch.rand(m, generator=g) < cfg.homophily, dst_in, dst_any)
    means = torch.randn(k, input_dim, generator=g)
    means = means / means.norm(dim=1, keepdim=True)
    x = means[y] + cfg.feature_noise * torch.randn(n, input_dim, generator=g) / input_dim ** 0.5
    masks = split_masks(n, cfg.train_fraction, cfg.val_fraction, cfg.split_seed)
    return Graph(x, y, torch.stack([src, dst]), k, masks)


def karate(cfg: GraphConfig) -> Graph:
    """Zachary's karate club from PyG (inline data): its 4 training vertices; the rest split val/test."""
    from torch_geometric.datasets import KarateClub

    d = KarateClub()[0]
    n = d.num_nodes
    rest = torch.nonzero(~d.train_mask).flatten()
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(cfg.split_seed))]
    val, test = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    val[rest[:len(rest) // 2]], test[rest[len(rest) // 2:]] = True, True
    return Graph(d.x, d.y, d.edge_index, int(d.y.max()) + 1, (d.train_mask.clone(), val, test))


def _lines(path: Path, key: str):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}={str(path.parent)!r}: {path.name} is missing; a graph folder needs "
                          "edges.txt, features.txt and labels.txt") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}={str(path.parent)!r}: {path.name} cannot be read as UTF-8 text ({e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            yield i, line.replace(",", " ").split()


def load_folder(path: str, cfg: GraphConfig, key: str = "data.path") -> Graph:
    """The graph in folder `path` (see the module docstring); ConfigError on a malformed file."""
    folder = Path(path)
    check(folder.is_dir(), key, path, "must be a folder with edges.txt, features.txt and labels.txt")

    def bad(name: str, line: int, what: str) -> ConfigError:
        return ConfigError(f"{key}={path!r}: {name} line {line}: {what}")

    labels = []
    for i, parts in _lines(folder / "labels.txt", key):
        if len(parts) != 1 or not parts[0].isdigit():
            raise bad("labels.txt", i, f"expected one class id (an integer >= 0), got {' '.join(parts)!r}")
        labels.append(int(parts[0]))
    n = len(labels)
    check(n >= 2, key, path, f"labels.txt holds {n} labels; a graph needs at least 2 vertices")
    rows, width = [], None
    for i, parts in _lines(folder / "features.txt", key):
        try:
            row = [float(v) for v in parts]
        except ValueError:
            raise bad("features.txt", i, f"expected numbers, got {' '.join(parts)[:60]!r}") from None
        if width is not None and len(row) != width:
            raise bad("features.txt", i, f"{len(row)} features, but earlier rows have {width}")
        width = len(row)
        rows.append(row)
    check(len(rows) == n, key, path, f"features.txt has {len(rows)} rows but labels.txt has {n} labels")
    edges = []
    for i, parts in _lines(folder / "edges.txt", key):
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise bad("edges.txt", i, f"expected two vertex ids (integers >= 0), got {' '.join(parts)!r}")
        u, v = int(parts[0]), int(parts[1])
        if u >= n or v >= n:
            raise bad("edges.txt", i, f"vertex id {max(u, v)} out of range; labels.txt has {n} vertices "
                                      f"(ids 0..{n - 1})")
        edges.append((u, v))
    check(len(edges) > 0, key, path, "edges.txt has no edges")
    y = torch.tensor(labels)
    num_classes = int(y.max()) + 1
    check(num_classes >= 2, key, path, "labels.txt must hold at least 2 classes")
    masks = split_masks(n, cfg.train_fraction, cfg.val_fraction, cfg.split_seed)
    return Graph(torch.tensor(rows), y, torch.tensor(edges).t(), num_classes, masks)


def build_graph(name: str, cfg: GraphConfig, path: str | None, num_classes: int, input_dim: int,
                seed: int) -> Graph:
    if name == "karate":
        return karate(cfg)
    if name == "graph":
        check(path is not None, "data.path", path, "data=graph needs a folder with edges.txt, features.txt, labels.txt")
        return load_folder(path, cfg)
    return csbm(cfg, num_classes, input_dim, seed)
