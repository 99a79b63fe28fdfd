"""Graph datasets for full-graph GNN training (strategy=gnnpipe | graph_parallel).

Three sources, all giving a `Graph` (the worker's `ctx.data`):
- `csbm`: a contextual stochastic block model, seeded: `num_classes` communities, each vertex draws
  `avg_degree / 2` edge ends, a fraction `homophily` of them inside its community; features are the
  community's mean (unit norm) plus Gaussian noise of norm ~`feature_noise`. Thousands to millions of
  vertices in seconds.
- `karate`: Zachary's karate club as PyTorch Geometric ships it (inline in the package; nothing is
  downloaded): 34 vertices, 4 classes, its 4 labelled training vertices.
- `graph`: a folder at `data.path` with `edges.txt` (one `u v` pair per line, 0-based ids, `#` comments),
  `features.txt` (one row per vertex: dense, every value, or sparse, `index:value` pairs of the nonzero
  entries, width 1 + the largest index; an all-zero row writes `0:0`) and `labels.txt` (one integer per vertex); optional split files
  `train.txt`, `val.txt`, `test.txt` (one vertex id per line: all three or none; disjoint) fix the split,
  e.g. a public split such as Planetoid's. A relative `data.path` is looked up from the working directory,
  then from the repository (the `cora` preset: ../shared/data/graphs/cora). A malformed file is a
  one-line ConfigError naming the file and line.

Edges are made undirected, without self loops, coalesced. Without split files, train/val/test masks
split the vertices with a fixed permutation (seed `graph.split_seed`), except karate's training
vertices. `graph.normalize_features` divides each feature row by its sum (as the GCN paper does).
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
    normalize_features: bool = False   # rows divided by their sum (bag-of-words features, e.g. Cora)

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


REPO = Path(__file__).resolve().parents[2]


def resolve_folder(path: str, key: str = "data.path") -> Path:
    """`path` as given if it exists, else (relative) from the repository root; a one-line error if absent."""
    folder = Path(path)
    if not folder.is_dir() and not folder.is_absolute() and (REPO / folder).is_dir():
        folder = REPO / folder
    where = f" (also looked up as {(REPO / path).resolve()})" if not Path(path).is_absolute() else ""
    check(folder.is_dir(), key, path, f"must be a folder with edges.txt, features.txt and labels.txt; not found{where}")
    return folder


def _bad(key: str, path: str, name: str, line: int, what: str) -> ConfigError:
    return ConfigError(f"{key}={path!r}: {name} line {line}: {what}")


def _labels(folder: Path, key: str, path: str) -> list[int]:
    labels = []
    for i, parts in _lines(folder / "labels.txt", key):
        if len(parts) != 1 or not parts[0].isdigit():
            raise _bad(key, path, "labels.txt", i, f"expected one class id (an integer >= 0), got {' '.join(parts)!r}")
        labels.append(int(parts[0]))
    return labels


def _features(folder: Path, key: str, path: str, n: int) -> torch.Tensor:
    """Dense rows (every value) or sparse rows (`index:value` pairs); one row per vertex."""
    rows, width, sparse = [], None, None
    for i, parts in _lines(folder / "features.txt", key):
        is_sparse = bool(parts) and ":" in parts[0]
        if sparse is not None and is_sparse != sparse:
            raise _bad(key, path, "features.txt", i, "mixes sparse (index:value) and dense rows")
        sparse = is_sparse
        try:
            row = [(int(a), float(b)) for a, b in (p.split(":", 1) for p in parts)] if sparse else \
                [float(v) for v in parts]
        except ValueError:
            raise _bad(key, path, "features.txt", i, f"expected numbers, got {' '.join(parts)[:60]!r}") from None
        if sparse and any(j < 0 for j, _ in row):
            raise _bad(key, path, "features.txt", i, "negative feature index")
        if not sparse and width is not None and len(row) != width:
            raise _bad(key, path, "features.txt", i, f"{len(row)} features, but earlier rows have {width}")
        width = len(row) if not sparse else width
        rows.append(row)
    check(len(rows) == n, key, path, f"features.txt has {len(rows)} rows but labels.txt has {n} labels")
    if not sparse:
        return torch.tensor(rows)
    dim = 1 + max((j for row in rows for j, _ in row), default=0)
    x = torch.zeros(n, dim)
    for v, row in enumerate(rows):
        for j, val in row:
            x[v, j] = val
    return x


def _edges(folder: Path, key: str, path: str, n: int) -> torch.Tensor:
    edges = []
    for i, parts in _lines(folder / "edges.txt", key):
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise _bad(key, path, "edges.txt", i, f"expected two vertex ids (integers >= 0), got {' '.join(parts)!r}")
        u, v = int(parts[0]), int(parts[1])
        if u >= n or v >= n:
            raise _bad(key, path, "edges.txt", i, f"vertex id {max(u, v)} out of range; labels.txt has {n} vertices "
                                                  f"(ids 0..{n - 1})")
        edges.append((u, v))
    check(len(edges) > 0, key, path, "edges.txt has no edges")
    return torch.tensor(edges).t()


SPLITS = ("train.txt", "val.txt", "test.txt")


def split_files(folder: Path, key: str, path: str, n: int) -> tuple[torch.Tensor, ...] | None:
    """Masks from train.txt / val.txt / test.txt (all three or none), disjoint, ids in range."""
    present = [name for name in SPLITS if (folder / name).exists()]
    if not present:
        return None
    check(len(present) == 3, key, path, f"has {', '.join(present)} but not "
          f"{', '.join(s for s in SPLITS if s not in present)}: split files come as all three or none")
    masks, seen = [], torch.zeros(n, dtype=torch.bool)
    for name in SPLITS:
        mask = torch.zeros(n, dtype=torch.bool)
        for i, parts in _lines(folder / name, key):
            if len(parts) != 1 or not parts[0].isdigit() or int(parts[0]) >= n:
                raise _bad(key, path, name, i, f"expected one vertex id in 0..{n - 1}, got {' '.join(parts)!r}")
            v = int(parts[0])
            if seen[v]:
                raise _bad(key, path, name, i, f"vertex {v} is listed twice (splits must be disjoint)")
            seen[v] = mask[v] = True
        check(bool(mask.any()), key, path, f"{name} lists no vertices")
        masks.append(mask)
    return tuple(masks)


def load_folder(path: str, cfg: GraphConfig, key: str = "data.path") -> Graph:
    """The graph in folder `path` (see the module docstring); ConfigError on a malformed file."""
    folder = resolve_folder(path, key)
    labels = _labels(folder, key, path)
    n = len(labels)
    check(n >= 2, key, path, f"labels.txt holds {n} labels; a graph needs at least 2 vertices")
    x = _features(folder, key, path, n)
    edges = _edges(folder, key, path, n)
    y = torch.tensor(labels)
    num_classes = int(y.max()) + 1
    check(num_classes >= 2, key, path, "labels.txt must hold at least 2 classes")
    masks = split_files(folder, key, path, n) or split_masks(n, cfg.train_fraction, cfg.val_fraction, cfg.split_seed)
    if cfg.normalize_features:
        x = x / x.sum(1, keepdim=True).clamp(min=1e-12)
    return Graph(x, y, edges, num_classes, masks)


def build_graph(name: str, cfg: GraphConfig, path: str | None, num_classes: int, input_dim: int,
                seed: int) -> Graph:
    if name == "karate":
        return karate(cfg)
    if name == "graph":
        check(path is not None, "data.path", path, "data=graph needs a folder with edges.txt, features.txt, labels.txt")
        return load_folder(path, cfg)
    return csbm(cfg, num_classes, input_dim, seed)
