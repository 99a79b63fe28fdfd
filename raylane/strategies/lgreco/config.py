"""lgreco's config: the candidate levels per family, the default level, the schedule and the budget.

Every user error is a one-line ConfigError naming the key (unknown family, empty candidate list,
alpha <= 0, adjust_every < 1, a default level outside the family, ...), raised at validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from raylane.strategies.ddp import DDPConfig
from raylane.strategies.blocks.compression_plan.levels import (FAMILIES, REFERENCE_SHAPE, canonical, family, powersgd_level,
                                              quant_level, topk_grid, topk_level, wire_bytes)
from raylane.validation import ConfigError, check, one_of

ERROR_METRICS = ("l2", "adam")
FAMILY_DEFAULT = {"powersgd": "powersgd:4", "topk": "topk:0.01", "quant": "int:4:128",
                  "mixed": "int:4:128"}
MAX_RANK = 64  # powersgd_ranks null: every integer rank up to this (level_range narrows it per layer)


@dataclass
class LGrecoConfig(DDPConfig):
    name: str = "lgreco"
    family: str = "powersgd"  # powersgd | topk | quant | mixed (every family's candidates for every layer)
    powersgd_ranks: Optional[list[int]] = None  # null: every integer rank 1..64
    topk_ratios: Optional[list[float]] = None  # null: the geometric grid of topk_per_octave
    topk_per_octave: int = 4  # densities 1e-4 .. 0.5, this many per doubling
    quant_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])  # int quantizers: bits x
    quant_block_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # ... block sizes
    quant_formats: list[str] = field(default_factory=lambda: ["bf16"])  # further quant specs (fp4:e2m1:128, ...)
    default_level: Optional[str] = None  # the uniform level the error budget is measured by; null: per family
    level_range: Optional[list[float]] = field(default_factory=lambda: [0.25, 4.0])  # [gamma, beta]: a layer's
    # candidates send gamma x to beta x the default level's bytes on it (the paper's transformer range); null: any
    adaptive: bool = True  # false: every compressible layer at default_level after warm-up (uniform)
    alpha: float = 1.0  # error budget: total error <= alpha x the default level's
    delta: float = 0.001  # error discretisation, as a fraction of the budget
    error_metric: str = "l2"  # l2: ||C(g) - g|| (the paper's); adam: ||(C(g) - g) / (sqrt(v) + eps)||, the
    # error in AdamW's update space (v: its second-moment estimate); needs optim.name=adamw
    warmup_steps: int = 20
    adjust_every: int = 50
    accumulate_steps: int = 5
    min_numel: int = 4096
    min_compression_rate: float = 2.0
    seed: int = 0  # PowerSGD's initial Q draws

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        one_of(f"{prefix}.family", self.family, FAMILIES)
        if self.level_range is not None:
            ok = len(self.level_range) == 2 and 0 < self.level_range[0] <= 1 <= self.level_range[1]
            check(ok, f"{prefix}.level_range", self.level_range,
                  "must be null or [gamma, beta], 0 < gamma <= 1 <= beta")
        check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be > 0")
        check(0 < self.delta <= 0.5, f"{prefix}.delta", self.delta, "must be in (0, 0.5]")
        one_of(f"{prefix}.error_metric", self.error_metric, ERROR_METRICS)
        check(self.adjust_every >= 1, f"{prefix}.adjust_every", self.adjust_every, "must be >= 1")
        check(self.warmup_steps >= 1, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 1")
        check(1 <= self.accumulate_steps <= self.adjust_every, f"{prefix}.accumulate_steps", self.accumulate_steps,
              f"must be in [1, {prefix}.adjust_every={self.adjust_every}]")
        check(self.min_numel >= 1, f"{prefix}.min_numel", self.min_numel, "must be >= 1")
        check(self.min_compression_rate >= 1, f"{prefix}.min_compression_rate", self.min_compression_rate,
              "must be >= 1")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "must be >= 0")
        check(1 <= self.topk_per_octave <= 64, f"{prefix}.topk_per_octave", self.topk_per_octave, "must be in [1, 64]")
        for i, r in enumerate(self.powersgd_ranks or []):
            check(r >= 1, f"{prefix}.powersgd_ranks[{i}]", r, "must be >= 1")
        for i, r in enumerate(self.topk_ratios or []):
            check(0 < r < 1, f"{prefix}.topk_ratios[{i}]", r, "must be in (0, 1)")
        for i, b in enumerate(self.quant_bits):
            check(2 <= b <= 8, f"{prefix}.quant_bits[{i}]", b, "must be in [2, 8]")
        for i, b in enumerate(self.quant_block_sizes):
            check(b >= 1, f"{prefix}.quant_block_sizes[{i}]", b, "must be >= 1")
        for i, q in enumerate(self.quant_formats):
            self._level(f"{prefix}.quant_formats[{i}]", q, ("quant",))
        lists = {"powersgd": "powersgd_ranks", "topk": "topk_ratios", "quant": "quant_bits"}
        if self.family != "mixed" and getattr(self, lists[self.family]) is not None:
            key = lists[self.family]
            check(bool(getattr(self, key)) or (self.family == "quant" and bool(self.quant_formats)),
                  f"{prefix}.{key}", getattr(self, key), f"must not be empty for {prefix}.family={self.family}")
        check(self.family != "quant" or bool(self.quant_block_sizes) or bool(self.quant_formats),
              f"{prefix}.quant_block_sizes", self.quant_block_sizes, "must not be empty for family=quant")
        allowed = ("powersgd", "topk", "quant") if self.family == "mixed" else (self.family,)
        self._level(f"{prefix}.default_level", self.default(), allowed)

    @staticmethod
    def _level(key: str, level: str, allowed: tuple[str, ...]) -> None:
        try:
            kind = family(canonical(level, key))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check(kind in allowed, key, level, f"must be a {'/'.join(allowed)} level")

    def check_run(self, run: Any) -> None:
        """error_metric=adam weighs errors by the optimizer's second moments: it needs AdamW. The
        default level must compress a layer min_compression_rate x at this world size: judged on a
        4096 x 4096 layer (larger than any that qualifies less), else no layer would be compressed."""
        check(self.error_metric != "adam" or run.optim.name == "adamw", "strategy.error_metric", self.error_metric,
              f"'adam' needs optim.name=adamw (got {run.optim.name!r}); use 'l2'")
        world = max(2, run.cluster.num_workers)
        level = canonical(self.default())
        rate = wire_bytes("none", REFERENCE_SHAPE, world) / wire_bytes(level, REFERENCE_SHAPE, world)
        check(rate >= self.min_compression_rate, "strategy.default_level", self.default(),
              f"sends {1 / rate:.2f}x full precision's bytes at cluster.num_workers={run.cluster.num_workers} "
              f"(needs {self.min_compression_rate:g}x fewer, strategy.min_compression_rate): no layer would be "
              "compressed")

    def warn_run(self, run: Any) -> list[str]:
        """A run too short for a re-plan shows only the warm-up and at most the first choice."""
        need = self.warmup_steps + self.adjust_every
        if not self.adaptive or run.train.steps > need:
            return []
        return [f"train.steps={run.train.steps} ends before L-GreCo re-plans once (strategy.warmup_steps="
                f"{self.warmup_steps} + strategy.adjust_every={self.adjust_every} = {need}); use train.steps > {need}"
                f" or a smaller strategy.adjust_every"]

    def default(self) -> str:
        return self.default_level or FAMILY_DEFAULT[self.family]

    def candidates(self) -> list[str]:
        """The family's levels (canonical specs), in table order; the default level added last if missing."""
        fams = ("powersgd", "topk", "quant") if self.family == "mixed" else (self.family,)
        out = []
        if "powersgd" in fams:
            ranks = self.powersgd_ranks if self.powersgd_ranks is not None else range(1, MAX_RANK + 1)
            out += [powersgd_level(r) for r in sorted(set(ranks))]
        if "topk" in fams:
            ratios = self.topk_ratios if self.topk_ratios is not None else topk_grid(self.topk_per_octave)
            out += [topk_level(r) for r in sorted(set(ratios))]
        if "quant" in fams:
            out += [quant_level(b, s) for b in sorted(set(self.quant_bits))
                    for s in sorted(set(self.quant_block_sizes))]
            out += [canonical(q) for q in self.quant_formats]
        out = [canonical(c) for c in dict.fromkeys(out)]
        default = canonical(self.default())
        return out if default in out else [*out, default]
