"""The keys that choose and tune a robust rule, shared by every sync path that aggregates rows: the
robust strategy's gradients (`strategy.aggregator`, ...) and DiLoCo's outer sync
(`strategy.outer.aggregator`, ...). `build_aggregator()` is the Pipeline ([bucketing ->] [NNM ->] rule)
and `check_rows(n, prefix)` its preconditions on the n rows it will see, each a one-line ConfigError."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raylane.strategies.blocks.aggregators.base import registry
from raylane.strategies.blocks.aggregators.clipping import CenteredClippingConfig
from raylane.strategies.blocks.aggregators.flag import FlagConfig
from raylane.strategies.blocks.aggregators.geomed import GeoMedConfig
from raylane.strategies.blocks.aggregators.krum import MultiKrumConfig
from raylane.strategies.blocks.aggregators.monna import MonnaConfig
from raylane.strategies.blocks.aggregators.pipeline import Pipeline
from raylane.strategies.blocks.aggregators.simple import TrimmedMeanConfig
from raylane.validation import check, one_of


@dataclass
class BucketingConfig:
    size: int = 1           # rows per bucket (1: off); Karimireddy et al. 2022 use s = 2
    seed: int = 0           # of the per-round shuffle (the same on every rank)

    def validate(self, prefix: str) -> None:
        check(self.size >= 1, f"{prefix}.size", self.size, "must be >= 1 (1: no bucketing)")


@dataclass
class RuleConfig:
    aggregator: str | None = "flag"  # mean | median | trimmed_mean | meamed | krum | multi_krum | bulyan | geomed | ...
    f: int = 0                      # Byzantine rows the rule tolerates
    nnm: bool = False               # nearest-neighbour mixing before the rule
    bucketing: BucketingConfig = field(default_factory=BucketingConfig)
    trimmed_mean: TrimmedMeanConfig = field(default_factory=TrimmedMeanConfig)
    multi_krum: MultiKrumConfig = field(default_factory=MultiKrumConfig)
    geomed: GeoMedConfig = field(default_factory=GeoMedConfig)
    centered_clipping: CenteredClippingConfig = field(default_factory=CenteredClippingConfig)
    flag: FlagConfig = field(default_factory=FlagConfig)
    monna: MonnaConfig = field(default_factory=MonnaConfig)

    def validate_rule(self, prefix: str) -> None:
        one_of(f"{prefix}.aggregator", self.aggregator, sorted(registry()))
        check(self.f >= 0, f"{prefix}.f", self.f, "must be >= 0")

    def aggregator_config(self) -> Any:
        cls = registry()[self.aggregator]
        return getattr(self, self.aggregator, None) or cls.config_cls()

    def build_aggregator(self) -> Pipeline:
        return Pipeline(self.aggregator, self.aggregator_config(), self.f, self.nnm, self.bucketing.size,
                        self.bucketing.seed)

    def check_rows(self, n: int, prefix: str) -> None:
        """The rule's conditions on n rows and f (n > 2f, Krum n > 2f + 2, m <= n, ...), naming `prefix`'s keys."""
        self.build_aggregator().check(n, prefix)
