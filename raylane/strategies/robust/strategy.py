"""robust: Byzantine-robust data parallel training with a robust aggregator (Flag, Krum, ...).

Each step every worker computes the gradient of its slice of the global batch and flattens it
(parameters with requires_grad, in order). Then, by `aggregate_on`:
- `workers` (peer to peer): the flat gradients are all-gathered through the Communicator
  (counted; `compression` compresses them, compressed_allgather: every rank decompresses the
  same payloads, its own included), every rank runs the same deterministic aggregator on the
  same (n, d) matrix — the same bits everywhere — writes the result into .grad, clips and
  steps. Replicas stay identical; a stateful rule's state (centered clipping's center) is in
  the worker half's state_dict, identical on every rank.
- `driver` (the paper's parameter server): the flat gradients (compressed if configured) go
  back through Ray with the step's `train_step` result; the driver half aggregates and every
  worker applies the update (`robust_apply`). Bytes are the payloads' sizes, as Ray carries them.
Byzantine workers (the fault plan's `byzantine` events) forge the row they send through
`comm.byzantine` (workers/chaos.py): wire-level modes corrupt what is sent, gradient-level modes
(alie, ipm, mimic, label_flip) are the colluding omniscient attacks of strategies/attacks.py.
The adaptive modes (alie_opt, ipm_opt) search their factor against this run's own pipeline and
state each round (`attack_target`). `f` is the number of Byzantine workers the rule is set to
tolerate; config checks (n > 2f for every rule, Krum n > 2f + 2, Bulyan n >= 4f + 3, m <= n,
r <= n, ...) run before any actor starts, each naming its key. `bucketing.size: s > 1` averages
shuffled buckets of s rows first, `nnm: true` mixes the rows (nearest-neighbour mixing) before
the rule (aggregators/pipeline.py). Rows with inf/nan are dropped, not aggregated: blocks/aggregators/round.py
(also the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from raylane.comm.collectives import compressed_allgather
from raylane.comm.compression_config import CompressionConfig
from raylane.strategies.blocks.aggregators.config import RuleConfig
from raylane.strategies.blocks.attacks import alie_z
from raylane.strategies.base import DriverStrategy, WorkerCalls, WorkerContext, WorkerStrategy, register
from raylane.strategies.ddp import clip_and_step
from raylane.strategies.blocks.aggregators.round import aggregate, run_rule
from raylane.validation import check, one_of

PLACES = ("workers", "driver")


@dataclass
class RobustConfig(RuleConfig):
    name: str = "robust"
    aggregate_on: str = "workers"   # workers (allgather, every rank aggregates) | driver (through Ray)
    compression: CompressionConfig = field(default_factory=CompressionConfig)   # of the exchanged gradients

    def validate(self, prefix: str) -> None:
        self.validate_rule(prefix)
        one_of(f"{prefix}.aggregate_on", self.aggregate_on, PLACES)
        check(self.compression.name != "powersgd", f"{prefix}.compression.name", self.compression.name,
              "robust exchanges whole gradients: choose a compressor other than powersgd")

    def check_run(self, run: Any) -> None:
        """The rule's condition on n and f (before any actor starts)."""
        n = run.cluster.num_workers
        self.check_rows(n, "strategy")
        _check_alie(run.faults.events, n)

    def warn_run(self, run: Any) -> list[str]:
        """f = 0: the rule is told no worker lies, so an attack in the plan goes through unfiltered."""
        if self.f > 0:
            return []
        attacks = sum(e.kind == "byzantine" for e in run.faults.events)
        return [f"strategy.f=0: aggregator={self.aggregator} tolerates no Byzantine worker"
                + (f", yet the fault plan has {attacks} byzantine event(s)" if attacks else "")
                + "; set strategy.f >= 1 (and a faults=byzantine* preset) to see the rule's effect"]


def _check_alie(events: list, n: int) -> None:
    """ALIE with the paper's z (z: null) needs floor(n/2 + 1) > f colluders, else no z exists."""
    alie = [i for i, e in enumerate(events) if e.kind == "byzantine" and e.mode == "alie" and e.z is None]
    colluders = len({events[i].rank for i in alie})
    for i in alie:
        try:
            alie_z(n, colluders)
        except ValueError:
            check(False, f"faults.events[{i}].mode", "alie",
                  f"the paper's z needs floor(n/2 + 1) > {colluders} colluders but cluster.num_workers={n}: "
                  f"use more workers (e.g. cluster.num_workers=15) or set faults.events[{i}].z")


class RobustWorker(WorkerStrategy):
    replicas_identical = True
    forges_gradients = True     # consults comm.byzantine: gradient-level attacks are possible
    update_methods = ("train_step", "robust_apply")

    def __init__(self, cfg: RobustConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        self.on_driver = cfg.aggregate_on == "driver"
        self.update_methods = ("robust_apply",) if self.on_driver else ("train_step",)
        self.aggregator = cfg.build_aggregator()
        self.compressor = cfg.compression.build(rank=ctx.rank, prefix="strategy.compression")
        self.agg_state: dict | None = None

    def _flat_gradient(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).detach().cpu()
                          for p in self.params])

    def train_step(self, batch, lr: float) -> dict[str, Any]:
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=False)
        loss = ctx.loss(batch)
        loss.backward()
        flat = self._flat_gradient()
        byz = ctx.comm.byzantine
        if byz is not None:
            flat = byz.forge(flat, ctx.rank, ctx.world_size, self.attack_target)
        ranks = list(byz.ranks) if byz is not None else []
        if self.on_driver:
            payload = self.compressor.compress(flat, "robust").to_bytes()
            return {"loss": loss.item(), "gradient": payload, "byzantine_ranks": ranks, "numel": flat.numel()}
        rows = self._exchange(flat)
        res, metrics = aggregate(self.aggregator, torch.stack(rows), self.agg_state, ranks, ctx.rank == 0)
        self.agg_state = res.state
        return {"loss": loss.item(), "grad_norm": self._apply(res.vector, lr), **metrics}

    def attack_target(self, G: torch.Tensor) -> torch.Tensor:
        """What this run's pipeline (and its current state) makes of G: the adaptive attacks' objective.
        (aggregate_on=driver: the driver's state is not here; a stateful rule is searched from its
        initial state.)"""
        return run_rule(self.aggregator, G, self.agg_state)[0].vector

    def _exchange(self, flat: torch.Tensor) -> list[torch.Tensor]:
        if self.cfg.compression.name == "none":
            return self.ctx.comm.allgather(flat, label="robust.allgather")
        return compressed_allgather(self.ctx.comm, flat, self.compressor, key="robust")

    def _apply(self, vector: torch.Tensor, lr: float) -> float:
        offset = 0
        for p in self.params:
            n = p.numel()
            grad = vector[offset:offset + n].view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            offset += n
        return clip_and_step(self.ctx, lr)

    def robust_apply(self, vector: torch.Tensor, lr: float) -> dict[str, float]:
        """Driver mode: apply the driver's aggregate."""
        return {"grad_norm": self._apply(vector, lr)}

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.agg_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agg_state = state.get("aggregator")


class RobustDriver(DriverStrategy):
    """Peer to peer by default; with aggregate_on=driver, gathers the gradients through Ray,
    aggregates here and sends every worker the update."""

    def __init__(self, cfg: RobustConfig, world_size: int):
        super().__init__(cfg, world_size)
        self.aggregator = cfg.build_aggregator()
        self.decoder = cfg.compression.build(prefix="strategy.compression")
        self.agg_state: dict | None = None

    def run_round(self, workers: WorkerCalls, step: int, sample_offset: int, lr: float) -> list[dict]:
        if self.cfg.aggregate_on == "workers":
            return super().run_round(workers, step, sample_offset, lr)
        results = workers.get(workers.call("train_step", sample_offset, lr))
        rows, sent = [], []
        for r in results:
            payload, numel = r.pop("gradient"), r.pop("numel")
            sent.append(payload.numel())
            rows.append(self.decoder.decompress(self.decoder.from_bytes(payload, (numel,), torch.float32)))
        res, metrics = aggregate(self.aggregator, torch.stack(rows), self.agg_state,
                                 results[0].pop("byzantine_ranks"), True)
        self.agg_state = res.state
        update = ray.put(res.vector)
        applied = workers.get(workers.call("robust_apply", update, lr))
        recv = res.vector.numel() * res.vector.element_size()
        for r, a, nbytes in zip(results, applied, sent):
            r.pop("byzantine_ranks", None)
            r.update(grad_norm=a["grad_norm"], bytes_sent=r["bytes_sent"] + nbytes, bytes_recv=r["bytes_recv"] + recv,
                     **metrics)
        return results

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.agg_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agg_state = state.get("aggregator")


register("robust", RobustConfig, RobustWorker, RobustDriver)
