"""lgreco's config: the candidate levels per family, the default level, the schedule and the budget.

Every user error is a one-line ConfigError naming the key (unknown family, empty candidate list,
alpha <= 0, adjust_every < 1, a default level outside the family, ...), raised at validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from raylane.strategies.ddp import DDPConfig
from raylane.strategies.lgreco_levels import FAMILIES, QUANT_FORMATS, family, powersgd_level, topk_level
from raylane.validation import ConfigError, check, one_of

ERROR_METRICS = ("l2", "adam")
FAMILY_DEFAULT = {"powersgd": "powersgd:4", "topk": "topk:0.01", "quant": "int4", "mixed": "int4"}


@dataclass
class LGrecoConfig(DDPConfig):
    name: str = "lgreco"
    family: str = "powersgd"  # powersgd | topk | quant | mixed (every family's candidates for every layer)
    powersgd_ranks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    topk_ratios: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.005, 0.01, 0.02, 0.03, 0.1])
    quant_formats: list[str] = field(default_factory=lambda: ["bf16", "int8", "int4", "int2", "fp4_e2m1"])
    default_level: Optional[str] = None  # the uniform level the error budget is measured by; null: per family
    level_range: Optional[list[float]] = field(default_factory=lambda: [0.5, 2.0])  # [gamma, beta]: a layer's
    # candidates send gamma x to beta x the default level's bytes on it (the paper's rank range); null: any
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
        for i, r in enumerate(self.powersgd_ranks):
            check(r >= 1, f"{prefix}.powersgd_ranks[{i}]", r, "must be >= 1")
        for i, r in enumerate(self.topk_ratios):
            check(0 < r < 0.5, f"{prefix}.topk_ratios[{i}]", r, "must be in (0, 0.5): top-k sends values and indices")
        for i, q in enumerate(self.quant_formats):
            one_of(f"{prefix}.quant_formats[{i}]", q, sorted(QUANT_FORMATS))
        lists = {"powersgd": "powersgd_ranks", "topk": "topk_ratios", "quant": "quant_formats"}
        if self.family == "mixed":
            check(bool(self.candidates()), f"{prefix}.family", self.family,
                  "needs a candidate in powersgd_ranks, topk_ratios or quant_formats")
        else:
            key = lists[self.family]
            check(bool(getattr(self, key)), f"{prefix}.{key}", getattr(self, key),
                  f"must not be empty for {prefix}.family={self.family}")
        try:
            kind = family(self.default())
        except ValueError as err:
            raise ConfigError(f"{prefix}.default_level={self.default_level!r}: {err}") from None
        allowed = ("powersgd", "topk", "quant") if self.family == "mixed" else (self.family,)
        check(kind in allowed, f"{prefix}.default_level", self.default_level,
              f"must be a {'/'.join(allowed)} level for {prefix}.family={self.family} "
              f"(e.g. {FAMILY_DEFAULT[self.family]!r})")

    def check_run(self, run: Any) -> None:
        """error_metric=adam weighs errors by the optimizer's second moments: it needs AdamW."""
        check(self.error_metric != "adam" or run.optim.name == "adamw", "strategy.error_metric", self.error_metric,
              f"'adam' needs optim.name=adamw (got {run.optim.name!r}); use 'l2'")

    def default(self) -> str:
        return self.default_level or FAMILY_DEFAULT[self.family]

    def candidates(self) -> list[str]:
        """The family's levels, in table order (the default level added last if missing)."""
        fams = ("powersgd", "topk", "quant") if self.family == "mixed" else (self.family,)
        out = []
        if "powersgd" in fams:
            out += [powersgd_level(r) for r in sorted(set(self.powersgd_ranks))]
        if "topk" in fams:
            out += [topk_level(r) for r in sorted(set(self.topk_ratios))]
        if "quant" in fams:
            out += list(dict.fromkeys(self.quant_formats))
        return out
