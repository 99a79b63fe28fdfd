"""scikit-learn's digits: 1797 8x8 grey images of handwritten digits, shipped inside the package.

Nothing is downloaded. Pixels are scaled to [0, 1] and flattened (64 features; the CNN
reshapes them to 1 x 8 x 8). A fixed permutation (seed 1234, independent of the run seed, so
every run sees the same test set) puts `eval_fraction` of the images in the held-out split.
`classification = True`: evaluation also reports accuracy.
"""

from __future__ import annotations

import torch

SPLIT_SEED = 1234


class Digits:
    classification = True

    def __init__(self, eval_fraction: float):
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_eval = max(1, int(len(y) * eval_fraction))
        self.eval_x, self.eval_y = x[perm[:n_eval]], y[perm[:n_eval]]
        self.x, self.y = x[perm[n_eval:]], y[perm[n_eval:]]
        self.num_train = len(self.y)
        self.vocab_size, self.input_dim = 10, x.shape[1]

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]

    def eval_batch(self, i: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch i of the held-out split; the last one may be short, and batches past the end wrap
        around (eval_batches = ceil(split / batch_size) covers every image exactly once)."""
        n = len(self.eval_y)
        start = i * batch_size
        idx = torch.arange(start, min(start + batch_size, n)) if start < n else \
            torch.arange(start, start + batch_size) % n
        return self.eval_x[idx], self.eval_y[idx]
