"""Adaptive outer compression (`strategy.outer.compression: lgreco`): L-GreCo's level choice applied to
DiLoCo's outer gradients, tensor by tensor.

A fragment's outer gradient is a list of named tensors. The uniform default sends every one at
`strategy.compression` (e.g. fp4). Every `outer.lgreco.replan_every`-th sync of a fragment (the
first included) re-chooses one level per tensor among the default and the int grid
(`quant_bits` x `quant_block_sizes`), each a chunkable fixed-size compressor of the comm layer's
registry: every rank measures ||C(x) - x|| of its own outer gradient for every tensor and level, the
[tensors, levels] table is summed over the ranks (one small all-gather through the same collective
thread, so it queues behind syncs in flight), and every rank solves the same knapsack
(blocks/compression_plan/dp.py): least bytes with total error <= alpha x the default's. Tensors under
`min_numel` values keep the default. The sync then runs one collective per level used, over the
concatenation of that level's tensors in fragment order; the default level's collective keeps the
fixed path's key and compressor, so a plan that leaves every tensor at the default is the fixed fp4
sync, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from raylane.comm import CompressionConfig, Communicator, Compressor, compressed_allgather
from raylane.strategies.blocks.compression_plan.dp import choose_levels
from raylane.strategies.blocks.compression_plan.levels import canonical, errors, new_compressor, quant_level, \
    wire_bytes
from raylane.validation import check


@dataclass
class OuterPlanConfig:
    replan_every: int = 4        # syncs of a fragment between two choices (the first sync chooses too)
    alpha: float = 1.0           # total error budget: alpha x the uniform default's
    delta: float = 0.01          # the knapsack's error unit, as a share of the budget
    quant_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    quant_block_sizes: list[int] = field(default_factory=lambda: [64, 128, 256])
    min_numel: int = 4096        # smaller tensors keep the default level

    def validate(self, prefix: str) -> None:
        check(self.replan_every >= 1, f"{prefix}.replan_every", self.replan_every, "must be >= 1")
        check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be > 0")
        check(0 < self.delta <= 1, f"{prefix}.delta", self.delta, "must be in (0, 1]")
        for i, b in enumerate(self.quant_bits):
            check(2 <= b <= 8, f"{prefix}.quant_bits[{i}]", b, "must be in [2, 8]")
        for i, b in enumerate(self.quant_block_sizes):
            check(b >= 1, f"{prefix}.quant_block_sizes[{i}]", b, "must be >= 1")
        check(self.min_numel >= 0, f"{prefix}.min_numel", self.min_numel, "must be >= 0")

    def levels(self, default: str) -> list[str]:
        """The candidates, the default first."""
        grid = [quant_level(b, s) for b in sorted(set(self.quant_bits)) for s in sorted(set(self.quant_block_sizes))]
        return [default] + [level for level in grid if canonical(level) != default]


class FragmentPlan:
    """One fragment's current level per tensor, and the collectives they group into."""

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], cfg: OuterPlanConfig, default: str,
                 default_compressor: Compressor, world: int):
        self.names, self.shapes, self.cfg, self.world = names, shapes, cfg, world
        self.candidates = cfg.levels(default)
        self.default = default
        self.compressors = {default: default_compressor}
        self.levels = [default] * len(names)
        self.syncs = 0  # syncs started with this plan's fragment

    def compressor(self, level: str) -> Compressor:
        if level not in self.compressors:
            self.compressors[level] = new_compressor(level)
        return self.compressors[level]

    def groups(self) -> list[tuple[str, list[int]]]:
        """(level, tensor indices in fragment order) per level in use, the default's first."""
        used = sorted(set(self.levels), key=lambda lv: (lv != self.default, self.candidates.index(lv)))
        return [(lv, [i for i, x in enumerate(self.levels) if x == lv]) for lv in used]

    def due(self) -> bool:
        return self.syncs % self.cfg.replan_every == 0

    def replan(self, pieces: list[torch.Tensor], comm: Communicator) -> dict[str, float]:
        """Choose the levels from this rank's outer gradient pieces and every other rank's (summed)."""
        table = np.full((len(pieces), len(self.candidates)), np.nan)
        for i, (piece, shape) in enumerate(zip(pieces, self.shapes)):
            if piece.numel() >= self.cfg.min_numel:
                table[i] = errors(self.candidates, piece.reshape(shape))
            else:
                table[i, 0] = 0.0
        flat = torch.from_numpy(np.nan_to_num(table, nan=-1.0).reshape(-1)).float()
        rows = compressed_allgather(comm, flat, CompressionConfig("none").build())
        summed = torch.stack(rows).double().sum(0).numpy().reshape(table.shape)
        summed[np.isnan(table)] = np.nan  # the same tensors on every rank: the same holes
        sizes = np.array([[wire_bytes(lv, shape, self.world) for lv in self.candidates] for shape in self.shapes],
                         dtype=np.float64)
        sizes[np.isnan(summed)] = np.inf
        choice = choose_levels(summed, sizes, [0] * len(pieces), self.cfg.alpha, self.cfg.delta)
        self.levels = [self.candidates[c] for c in choice.levels]
        planned = float(sum(sizes[i, c] for i, c in enumerate(choice.levels)))
        uniform = float(sizes[:, 0].sum())
        return {"outer/plan_bytes": planned, "outer/plan_bytes_uniform": uniform,
                "outer/plan_levels": float(len(set(self.levels)))}

    def state_dict(self) -> dict:
        return {"levels": list(self.levels), "syncs": self.syncs}

    def load_state_dict(self, state: dict) -> None:
        self.levels, self.syncs = list(state["levels"]), int(state["syncs"])
