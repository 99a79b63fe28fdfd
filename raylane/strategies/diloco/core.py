"""What diloco and replica_diloco share: the config, the outer loop (a fragment schedule and the outer
sync it drives, with its byte counters), peer seeding for recovery, and the driver half.

`OuterLoop` is DiLoCo's outer bookkeeping over any list of parameter fragments: a plain replica's
parameters (strategy.py) or the shards a multi-rank replica's rank owns (replicas/diloco.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from raylane.comm import CompressionConfig, Communicator, spec_of
from raylane.strategies.blocks.compression_plan.levels import canonical
from raylane.strategies.base import DriverStrategy, Layout, WorkerCalls
from raylane.strategies.blocks.aggregators.config import RuleConfig
from raylane.strategies.diloco.fragments import PATTERNS, SyncSchedule
from raylane.strategies.diloco.outer import OuterRule, OuterSync
from raylane.strategies.diloco.outer_plan import FragmentPlan, OuterPlanConfig
from raylane.validation import ConfigError, check, one_of


OUTER_COMPRESSION = ("fixed", "lgreco")


@dataclass
class OuterConfig(RuleConfig):
    """`strategy.outer`: how the replicas' outer gradients are combined. aggregator null (the default):
    their mean, by a compressed all-reduce (plain DiLoCo). A robust rule (any of strategy=robust's,
    with f, nnm, bucketing and the rule's own keys): gathered and aggregated (diloco/outer.py)."""

    aggregator: str | None = None
    compression: str = "fixed"  # fixed: strategy.compression on every tensor | lgreco: a level per tensor
    lgreco: OuterPlanConfig = field(default_factory=OuterPlanConfig)  # compression: lgreco's planner

    def validate(self, prefix: str) -> None:
        if self.aggregator is not None:
            self.validate_rule(prefix)
        else:
            check(self.f == 0, f"{prefix}.f", self.f, f"needs {prefix}.aggregator (a robust rule); the mean tolerates none")
        one_of(f"{prefix}.compression", self.compression, OUTER_COMPRESSION)
        self.lgreco.validate(f"{prefix}.lgreco")


@dataclass
class DiLoCoConfig:
    name: str = "diloco"
    sync_every: int = 50  # H: inner steps between two syncs of a fragment
    fragments: int = 1  # P: fragments of the model's blocks, synced in turn (<= model.n_layer)
    fragment_pattern: str = "strided"  # strided (blocks p, p+P, ...) | sequential
    overlap_steps: int = 0  # tau: inner steps between starting a fragment's sync and merging it
    merge_alpha: float = 0.0  # merge: local = alpha * local + (1 - alpha) * global
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True  # (Nesterov with outer_momentum=0 is plain SGD)
    compression: CompressionConfig = field(default_factory=CompressionConfig)  # of outer gradients
    recover_from: str = "checkpoint"  # checkpoint | peer_replica: what a lost replica restarts from
    outer: OuterConfig = field(default_factory=OuterConfig)  # mean (all-reduce) or a robust rule (gather)

    @property
    def aggregates_rows(self) -> bool:
        """The outer gradients are gathered as rows: row-forging Byzantine modes apply to them."""
        return self.outer.aggregator is not None

    def replicas(self, run: Any) -> int:
        return run.cluster.num_workers // max(1, getattr(run.cluster, "ranks_per_replica", 1))

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.recover_from", self.recover_from, RECOVER_FROM)
        check(self.sync_every >= 1, f"{prefix}.sync_every", self.sync_every, "must be >= 1")
        check(1 <= self.fragments <= self.sync_every, f"{prefix}.fragments", self.fragments,
              f"must be in [1, {prefix}.sync_every={self.sync_every}]")
        one_of(f"{prefix}.fragment_pattern", self.fragment_pattern, PATTERNS)
        check(0 <= self.overlap_steps < self.sync_every, f"{prefix}.overlap_steps", self.overlap_steps,
              f"must be in [0, {prefix}.sync_every - 1 = {self.sync_every - 1}]")
        check(0 <= self.merge_alpha <= 1, f"{prefix}.merge_alpha", self.merge_alpha, "must be in [0, 1]")
        check(self.outer_lr > 0, f"{prefix}.outer_lr", self.outer_lr, "must be > 0")
        check(0 <= self.outer_momentum < 1, f"{prefix}.outer_momentum", self.outer_momentum, "must be in [0, 1)")
        try:
            compressor = self.compression.build(prefix=f"{prefix}.compression")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.outer.compression == "lgreco":
            check(self.compression.name in ("fp4", "int") and not self.compression.error_feedback,
                  f"{prefix}.compression.name", self.compression.name,
                  f"{prefix}.outer.compression=lgreco plans quantizers per tensor: the default must be fp4 or int "
                  "without error_feedback")
        check(self.compression.zstd_level is None, f"{prefix}.compression.zstd_level", self.compression.zstd_level,
              "must be null: the outer all-reduce needs fixed-size payloads")
        check(compressor.chunkable and compressor.fixed_size, f"{prefix}.compression.name", self.compression.name,
              "the outer all-reduce needs a chunkable fixed-size compressor (none, bf16, int, fp4, ...; not powersgd)")

    def check_run(self, run: Any) -> None:
        """Checks against the whole run config, before any actor starts."""
        blocks = run.model.n_layer if run.model.name == "char_transformer" else len(run.model.hidden)
        check(self.fragments <= blocks, "strategy.fragments", self.fragments,
              f"must be <= the model's {blocks} blocks (model.n_layer / model.hidden)")
        if self.outer.aggregator is not None:  # the rule sees one row per replica
            self.outer.check_rows(self.replicas(run), "strategy.outer")

    def warn_run(self, run: Any) -> list[str]:
        """Legal settings that make a run look broken: fewer than two outer steps."""
        warnings = []
        if self.recover_from == "peer_replica" and self.overlap_steps:
            warnings.append(f"strategy.recover_from=peer_replica needs strategy.overlap_steps=0 (no sync in flight "
                            f"between steps); with overlap_steps={self.overlap_steps} a fault restores the checkpoint")
        outer = run.train.steps // self.sync_every
        if outer >= 2:
            return warnings
        return warnings + [
            f"train.steps={run.train.steps} gives {outer} outer step(s) with strategy.sync_every={self.sync_every}: "
            f"the eval scores the global (outer) parameters, which only move at an outer step; "
            f"use train.steps >= {2 * self.sync_every} or a smaller strategy.sync_every"]

    def eval_label(self, step: int) -> str:
        """What the run's eval loss scores (the summary says it beside the number)."""
        return f"global (outer) parameters, {step // self.sync_every} outer steps"


RECOVER_FROM = ("checkpoint", "peer_replica")


def peer_seeded(cfg: DiLoCoConfig, layout: Layout, seed_of: Callable[[int], str]) -> Layout:
    """`layout` with seed classes (`seed_of(rank)`) when `cfg.recover_from` is peer_replica and no
    sync is in flight between steps (overlap_steps = 0): a rank lost at a step with no outer sync
    is restored, with the rest of its replica, from a copy of a live peer replica that completed
    the step, and the other replicas keep their state (no rollback). The copied replica's inner
    progress since its last sync is replaced by the peer's. Otherwise: the newest checkpoint."""
    if cfg.recover_from != "peer_replica" or cfg.overlap_steps:
        return layout
    return replace(layout, seeds=tuple(seed_of(r) for r in range(len(layout.state_keys))))


class OuterLoop:
    """The schedule of fragment syncs and the outer sync that runs them, over `parts` (per fragment:
    (name, tensor) pairs). `advance()` after each inner step: start the due fragment's sync, merge the
    syncs due; returns the step's diloco/ metrics."""

    def __init__(self, cfg: DiLoCoConfig, parts: list, comm: Communicator, rank: int,
                 byzantine: Callable[[], Any] = lambda: None, row_of: Callable[[int], int] = lambda r: r):
        self.schedule = SyncSchedule(cfg.sync_every, cfg.fragments, cfg.overlap_steps)
        compressor = cfg.compression.build(rank=rank, prefix="strategy.compression")
        rule = None
        if cfg.outer.aggregator is not None:
            rule = OuterRule(cfg.outer.build_aggregator(), byzantine, row_of, measure=rank == 0)
        self.outer = OuterSync(parts, cfg, compressor, comm, rule)
        if cfg.outer.compression == "lgreco":
            default = canonical(spec_of(cfg.compression))
            self.outer.plans = [FragmentPlan(f.names, [tuple(p.shape) for p in f.local], cfg.outer.lgreco, default,
                                             compressor, comm.world_size) for f in self.outer.fragments]
        self.step = 0  # inner steps taken
        self.bytes_total = 0
        self.peak_bytes_step = 0

    def advance(self) -> dict[str, float]:
        """After one inner step: drift, then this step's outer work."""
        self.step += 1
        out: dict[str, float] = {"diloco/drift": self.outer.drift()}
        fragment = self.schedule.starting(self.step)
        sent = 0
        if fragment is not None:
            self.outer.plan_metrics = {}
            sent = self.outer.start(fragment, self.step, self.schedule.merge_step(self.step)).bytes_sent
            out.update(self.outer.plan_metrics)
        norms = [self.outer.finish(sync) for sync in self.outer.due(self.step)]
        self.bytes_total += sent
        self.peak_bytes_step = max(self.peak_bytes_step, sent)
        out.update({"diloco/fragment": -1 if fragment is None else fragment, "diloco/bytes_this_step": sent,
                    "diloco/bytes_total": self.bytes_total, "diloco/peak_bytes_step": self.peak_bytes_step,
                    "diloco/in_flight": len(self.outer.in_flight), "diloco/merged": len(norms)})
        if norms:
            out["diloco/outer_grad_norm"] = max(norms)
            out.update(self.outer.metrics)
        return out

    def finish_syncs(self) -> dict[str, float]:
        """Merge every sync still in flight, in the order they started (the end of a run)."""
        norms = [self.outer.finish(sync) for sync in list(self.outer.in_flight)]
        return {"diloco/merged": len(norms), "diloco/in_flight": len(self.outer.in_flight)}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "bytes_total": self.bytes_total, "peak_bytes_step": self.peak_bytes_step,
                "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.bytes_total = state["step"], state["bytes_total"]
        self.peak_bytes_step = state["peak_bytes_step"]
        self.outer.load_state_dict(state["outer"])


class DiLoCoDriver(DriverStrategy):
    """Peer to peer (every worker: `train_step`); at the end, merge the syncs still in flight."""

    def finish(self, workers: WorkerCalls) -> None:
        workers.get(workers.call("finish_syncs"))
