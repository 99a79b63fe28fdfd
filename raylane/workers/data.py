"""Datasets and deterministic sharding.

A dataset is a list of training samples addressed by index, plus a held-out eval split.
The sample stream is global: sample g of the run is `permutation(seed, epoch)[g % n]`
with epoch = g // n. Step t of a run with global batch G takes samples
[offset, offset + G), and rank r of W takes its contiguous slice of that range. So the
data position is one integer (samples consumed), a resume is exact, and the batches of
all ranks concatenated are the global batch — whatever W is.

Datasets: `chars` (a character-level corpus: Python's `pydoc_data.topics` English text
by default, or any UTF-8 text file via `data.path`), `synthetic` (a classification
task labelled by a fixed random teacher network) and `digits` (scikit-learn's bundled
8x8 handwritten digits: workers/digits.py); whole graphs for full-graph GNN training: `csbm`,
`karate`, `graph` (workers/graphs.py). A dataset with `classification = True` also gets eval/accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from raylane.validation import ConfigError, check, one_of
from raylane.workers.graphs import GRAPH_DATASETS, GraphConfig, build_graph

DATASETS = ("chars", "synthetic", "digits", *GRAPH_DATASETS)
_NOT_CHARS = ("seq_len",)
_NOT_SYNTHETIC = ("num_samples", "input_dim", "num_classes")
UNUSED = {"chars": (*_NOT_SYNTHETIC, "graph"), "synthetic": ("path", *_NOT_CHARS, "graph"),
          "digits": (*_NOT_CHARS, *_NOT_SYNTHETIC, "graph"),
          **{g: (*_NOT_CHARS, "num_samples") for g in GRAPH_DATASETS}}  # keys a data set never reads


@dataclass
class DataConfig:
    name: str = "chars"
    path: str | None = None           # chars: a UTF-8 text file; default: pydoc_data.topics
    batch_size: int = 16               # samples per worker per step
    seq_len: int = 64                  # chars: tokens per sample
    eval_fraction: float = 0.1         # tail of the corpus held out for eval
    eval_batches: int = 8              # eval batches (of batch_size) per evaluation, split over workers
    num_samples: int = 16384           # synthetic: training samples
    input_dim: int = 32                # synthetic: features
    num_classes: int = 10              # synthetic, csbm: classes
    graph: GraphConfig = field(default_factory=GraphConfig)  # csbm | karate | graph: workers/graphs.py

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.name", self.name, DATASETS)
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        check(self.seq_len >= 2, f"{prefix}.seq_len", self.seq_len, "must be >= 2")
        check(0 < self.eval_fraction < 1, f"{prefix}.eval_fraction", self.eval_fraction, "must be in (0, 1)")
        check(self.eval_batches >= 1, f"{prefix}.eval_batches", self.eval_batches, "must be >= 1")
        check(self.num_samples >= 2, f"{prefix}.num_samples", self.num_samples, "must be >= 2")
        check(self.input_dim >= 1, f"{prefix}.input_dim", self.input_dim, "must be >= 1")
        check(self.num_classes >= 2, f"{prefix}.num_classes", self.num_classes, "must be >= 2")
        self.graph.validate(f"{prefix}.graph")
        if self.name == "graph":  # a folder: parsed here, so that a malformed file stops the run before Ray starts
            build_graph(self.name, self.graph, self.path, self.num_classes, self.input_dim, 0)
        elif self.path is not None:
            check(Path(self.path).is_file(), f"{prefix}.path", self.path, "must be a readable text file")
            if self.name == "chars":
                check_corpus(read_corpus(self.path, f"{prefix}.path"), self.seq_len, self.eval_fraction,
                             f"{prefix}.path", self.path)


def read_corpus(path: str, key: str = "data.path") -> str:
    """The text of a `data.path` file; ConfigError when it cannot be read or is not UTF-8 text."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}={path!r}: cannot be read ({e.strerror or e}); must be a readable text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}={path!r}: not UTF-8 text (undecodable byte at offset {e.start}); "
                          "must be a text file") from None
    check("\x00" not in text, key, path, "looks binary (contains NUL bytes); must be a text file")
    return text


def min_corpus_chars(seq_len: int, eval_fraction: float) -> int:
    """The fewest chars a corpus needs: both its train and eval parts must hold more than one
    window of seq_len + 1 chars (the condition CharCorpus checks)."""
    n = max(2 * (seq_len + 2), int((seq_len + 1) / eval_fraction), int((seq_len + 2) / (1 - eval_fraction))) - 2
    while not _corpus_fits(n, seq_len, eval_fraction):
        n += 1
    return n


def _corpus_fits(n_chars: int, seq_len: int, eval_fraction: float) -> bool:
    split = int(n_chars * (1 - eval_fraction))
    return split - seq_len - 1 > 0 and n_chars - split > seq_len + 1


def check_corpus(text: str, seq_len: int, eval_fraction: float, key: str, value: object) -> None:
    """ConfigError unless `text` is long enough for seq_len and eval_fraction."""
    check(len(text) > 0, key, value, "the file is empty; must be a non-empty text file")
    if not _corpus_fits(len(text), seq_len, eval_fraction):
        need = min_corpus_chars(seq_len, eval_fraction)
        raise ConfigError(f"{key}={value!r}: too short ({len(text)} chars); data.seq_len={seq_len} with "
                          f"data.eval_fraction={eval_fraction} needs at least {need} chars")


class Dataset(Protocol):
    num_train: int
    vocab_size: int        # number of classes / tokens the model predicts
    input_dim: int         # features per sample (0 for token inputs)

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def eval_batch(self, i: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def default_text() -> str:
    """The English text of Python's help topics (ships with every CPython)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class CharCorpus:
    """Character-level LM data: input = seq_len chars, target = the next seq_len chars."""

    input_dim = 0

    def __init__(self, text: str, seq_len: int, eval_fraction: float):
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        lookup = {c: i for i, c in enumerate(self.chars)}
        tokens = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        split = int(len(tokens) * (1 - eval_fraction))
        self.train, self.eval = tokens[:split], tokens[split:]
        self.seq_len = seq_len
        self.num_train = len(self.train) - seq_len - 1
        check_corpus(text, seq_len, eval_fraction, "data.seq_len", seq_len)

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        w = tokens[idx]
        return w[:, :-1], w[:, 1:]

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.train, indices)

    def eval_batch(self, i: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_windows = (len(self.eval) - 1) // self.seq_len
        starts = (torch.arange(i * batch_size, (i + 1) * batch_size) % n_windows) * self.seq_len
        return self._windows(self.eval, starts)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class SyntheticClassification:
    """Gaussian inputs labelled by a fixed random two-layer teacher (seeded)."""

    classification = True

    def __init__(self, num_samples: int, input_dim: int, num_classes: int, seed: int, eval_fraction: float):
        g = torch.Generator().manual_seed(10_000 + seed)
        n_eval = max(1, int(num_samples * eval_fraction))
        x = torch.randn(num_samples + n_eval, input_dim, generator=g)
        w1 = torch.randn(input_dim, 4 * input_dim, generator=g) / input_dim ** 0.5
        w2 = torch.randn(4 * input_dim, num_classes, generator=g) / (4 * input_dim) ** 0.5
        y = (torch.relu(x @ w1) @ w2).argmax(1)
        self.x, self.y, self.num_train = x, y, num_samples
        self.vocab_size, self.input_dim = num_classes, input_dim

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]

    def eval_batch(self, i: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_eval = len(self.x) - self.num_train
        idx = self.num_train + torch.arange(i * batch_size, (i + 1) * batch_size) % n_eval
        return self.x[idx], self.y[idx]


def build_dataset(cfg: DataConfig, seed: int) -> Dataset:
    if cfg.name in GRAPH_DATASETS:
        return build_graph(cfg.name, cfg.graph, cfg.path, cfg.num_classes, cfg.input_dim, seed)
    if cfg.name == "chars":
        text = read_corpus(cfg.path) if cfg.path else default_text()
        return CharCorpus(text, cfg.seq_len, cfg.eval_fraction)
    if cfg.name == "digits":
        from raylane.workers.digits import Digits

        return Digits(cfg.eval_fraction)
    return SyntheticClassification(cfg.num_samples, cfg.input_dim, cfg.num_classes, seed, cfg.eval_fraction)


class GlobalSampler:
    """Maps a global sample number to a training index: a fresh permutation per epoch."""

    def __init__(self, num_train: int, seed: int):
        self.num_train, self.seed = num_train, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_train, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Training indices of global samples [start, start + count)."""
        g = torch.arange(start, start + count)
        epoch, pos = g // self.num_train, g % self.num_train
        out = torch.empty(count, dtype=torch.long)
        for e in torch.unique(epoch).tolist():
            mask = epoch == e
            out[mask] = self._permutation(e)[pos[mask]]
        return out

