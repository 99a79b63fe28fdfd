"""lgreco: layer-wise adaptive gradient compression (L-GreCo, Markov et al., MLSys 2024).

ddp's bucketed, backward-overlapped sync (ddp.py) with a compression level per layer: as a
compressible layer's gradient is ready, g + its error-feedback residual goes through its level's
collective (strategies/blocks/compression_plan/levels.py), async on the comm layer's thread; small layers (fewer than
`min_numel` values, or the default level compresses them less than `min_compression_rate`) go at
full precision in ddp buckets. After every collective returned, the step's state changes are
committed (residuals, PowerSGD warm-start Q, accumulation, step count), then clip and optimizer
step: a step that fails changes nothing, so it can be run again.

Levels: the first `warmup_steps` steps send full precision. At the start of the step after
s = warmup_steps + k * adjust_every (k >= 0) the levels are re-chosen: over the `accumulate_steps`
steps before, rank r summed the error-compensated gradients of its share of the compressible
layers (layer i, in parameter order, when i % W == r) and now measures them for every level; the
[layers, levels] error table is all-gathered through the Communicator; bytes are formulas; every
rank solves the same knapsack (lgreco_dp.choose_levels: least bytes with total error <= alpha x
the default level's) and so applies the same levels. `error_metric: adam` weighs each error per
value by AdamW's 1 / (sqrt(v) + eps) (the same v on every rank): the error in the update space.
A layer nobody measured (its owner was replaced) keeps its level. `adaptive: false` puts every
compressible layer at `default_level` after warm-up without measuring: the uniform baseline,
through the same code.

Per-layer state lives across steps: one PowerSGD per layer (its warm-start Q), an error-feedback
residual buffer, a buffer for g + residual; residuals come from the compressor's own decode of what
this rank sent (the quantized allreduce's `sent`, top-k's own payload, PowerSGD's approximation).

State: replica (the same on every rank) - step count, levels, PowerSGD Q per layer;
local (`local_state_dict`, per rank) - residuals, accumulations. Metrics (rank 0's):
lgreco/compressed_layers, lgreco/bytes_per_step_planned (of the compressible layers at their levels, all
ranks together, from the formulas the Communicator counts with); at a re-choice
lgreco/error_total, error_budget, bytes_chosen, bytes_default; and the plan, at the first step and
at every step whose levels were (re)set: per layer lgreco/plan/<param>/level (the spec),
/bytes (all ranks, one sync), /bytes_per_value (one rank's payload per gradient value; fp32 4),
/error (at a re-choice). `raylane.report` draws these as layers x steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raylane.comm import compressed_allgather, powersgd_allreduce, quantized_allreduce
from raylane.comm.powersgd import PowerSGD
from raylane.strategies.base import WorkerContext, register
from raylane.strategies.ddp import DDPWorker, _Bucket, clip_and_step, group_buckets
from raylane.strategies.lgreco.config import LGrecoConfig
from raylane.strategies.blocks.compression_plan.dp import choose_levels
from raylane.strategies.blocks.compression_plan.levels import (applies, bytes_per_value, canonical, compressor, errors, family,
                                              in_range, new_compressor, wire_bytes)
from raylane.validation import ConfigError


@dataclass
class _Layer:
    name: str
    param: torch.nn.Parameter
    index: int  # among the compressible layers
    available: list[bool]  # per table column


@dataclass
class _Pending:
    """One layer's sync in this step, committed only once every collective of the step returned."""

    corrected: torch.Tensor  # the layer's g + residual buffer
    sent: torch.Tensor | None = None


class LGrecoWorker(DDPWorker):
    replicas_identical = True

    def __init__(self, cfg: LGrecoConfig, ctx: WorkerContext):
        self.columns = cfg.candidates()
        self.default_level = canonical(cfg.default())  # candidates() holds it
        self.layers = self._plan(cfg, ctx.model, ctx.world_size)
        self._layer_of_param = {id(layer.param): layer for layer in self.layers}
        self._layer_of_bucket: dict[int, _Layer] = {}
        super().__init__(cfg, ctx)
        self.level = {layer.name: "none" for layer in self.layers}
        self.residual: dict[str, torch.Tensor] = {}
        self._corr = {layer.name: torch.empty_like(layer.param, dtype=torch.float32) for layer in self.layers}
        self._sent = {layer.name: torch.empty_like(layer.param, dtype=torch.float32) for layer in self.layers}
        self.psgd: dict[str, PowerSGD] = {}
        self.steps_done, self.last_adjust = 0, -1
        self.accum: dict[str, torch.Tensor] = {}
        self.accum_count: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._plan_due = True

    def _plan(self, cfg: LGrecoConfig, model: torch.nn.Module, world: int) -> list[_Layer]:
        """The compressible layers: >= min_numel values, the default level applies and compresses them
        min_compression_rate x at this world size; per layer, the candidates that apply and are in range."""
        layers = []
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if not p.requires_grad or p.numel() < cfg.min_numel or not applies(self.default_level, shape, world):
                continue
            rate = wire_bytes("none", shape, max(world, 2)) / wire_bytes(self.default_level, shape, max(world, 2))
            if rate >= cfg.min_compression_rate:
                ok = [c == self.default_level or (applies(c, shape, world)
                                                  and in_range(c, self.default_level, shape, world, cfg.level_range))
                      for c in self.columns]
                layers.append(_Layer(name, p, len(layers), ok))
        if not layers:
            raise ConfigError(f"strategy.default_level={cfg.default()!r}: no layer qualifies at world size {world} "
                              f"(>= strategy.min_numel={cfg.min_numel} values, compressed >= "
                              f"strategy.min_compression_rate={cfg.min_compression_rate:g}x); use strategy=ddp")
        return layers

    def _make_buckets(self, cap_bytes: int) -> list[_Bucket]:
        dense = [p for p in self._params() if id(p) not in self._layer_of_param]
        buckets = group_buckets(dense, cap_bytes) if dense else []
        for layer in reversed(self.layers):
            bucket = _Bucket([layer.param])
            self._layer_of_bucket[id(bucket)] = layer
            buckets.append(bucket)
        return buckets

    # -- one step -----------------------------------------------------------------------
    def train_step(self, batch, lr: float) -> dict[str, float]:
        ctx = self.ctx
        metrics = self._maybe_adjust()
        if self._plan_due:
            metrics.update(self._plan_metrics())
        self._pending = {}
        ctx.optimizer.zero_grad(set_to_none=False)
        loss = ctx.loss(batch)
        q_before = {name: dict(p._q) for name, p in self.psgd.items()}
        try:
            self.sync_gradients(loss.backward)
        except BaseException:  # a failed step changes nothing: PowerSGD's warm-start Q back as it was
            for name, q in q_before.items():
                self.psgd[name]._q = q
            raise
        self._commit()
        grad_norm = clip_and_step(ctx, lr)
        planned = sum(wire_bytes(self.level[l.name], tuple(l.param.shape), ctx.world_size) for l in self.layers)
        metrics.update({"loss": loss.item(), "grad_norm": grad_norm,
                        "lgreco/compressed_layers": sum(v != "none" for v in self.level.values()),
                        "lgreco/bytes_per_step_planned": planned})
        return metrics

    def _reduce(self, bucket: _Bucket) -> Any:
        comm, layer = self.ctx.comm, self._layer_of_bucket.get(id(bucket))
        if layer is None:
            return quantized_allreduce(comm, bucket.buffer, compressor("none"), "avg", key="lgreco/dense",
                                       async_op=True)
        name, level = layer.name, self.level[layer.name]
        corrected = self._corr[name].view(-1)
        residual = self.residual.get(name)
        if residual is None:
            corrected.copy_(bucket.buffer)
        else:
            torch.add(bucket.buffer, residual.view(-1), out=corrected)
        self._pending[name] = _Pending(self._corr[name])
        bucket.buffer.copy_(corrected)
        kind = family(level)
        if kind == "topk":
            return compressed_allgather(comm, bucket.buffer, compressor(level), None, key=name, async_op=True)
        if kind == "powersgd":
            return powersgd_allreduce(comm, [bucket.buffer.view(layer.param.shape)], self.psgd[name], "avg",
                                      key=name, async_op=True)
        if kind == "quant":
            return quantized_allreduce(comm, bucket.buffer, compressor(level), "avg", key=name, async_op=True,
                                       sent=self._sent[name])
        return quantized_allreduce(comm, bucket.buffer, compressor(level), "avg", key=name, async_op=True)

    def _reduced(self, bucket: _Bucket, result: Any) -> None:
        layer = self._layer_of_bucket.get(id(bucket))
        if layer is None:
            return
        pending, kind = self._pending[layer.name], family(self.level[layer.name])
        if kind == "topk":  # every rank's decompressed top-k: average in rank order, in fp32
            total = result[0].float().clone()
            for t in result[1:]:
                total.add_(t.float())
            bucket.buffer.copy_(total.div_(len(result)).view(-1))
            pending.sent = result[self.ctx.comm.rank]  # this rank's own payload, decoded
        elif kind == "powersgd":  # PowerSGD's residual: what the shared approximation left out
            pending.sent = bucket.buffer
        elif kind == "quant":  # the decode of the chunks this rank sent (filled by the collective)
            pending.sent = self._sent[layer.name]

    def _commit(self) -> None:
        accumulate = self.cfg.adaptive and self._accumulating(self.steps_done + 1)
        world, rank = self.ctx.world_size, self.ctx.rank
        for layer in self.layers:
            name, pending = layer.name, self._pending.pop(layer.name)
            if pending.sent is None:  # full precision: nothing left out
                self.residual.pop(name, None)
            else:
                res = self.residual.get(name)
                if res is None:
                    res = self.residual[name] = torch.empty_like(pending.corrected)
                torch.sub(pending.corrected, pending.sent.view_as(pending.corrected), out=res)
            if accumulate and layer.index % world == rank:
                acc = self.accum.get(name)
                if acc is None:
                    self.accum[name] = pending.corrected.clone()
                else:
                    acc.add_(pending.corrected)
                self.accum_count[name] = self.accum_count.get(name, 0) + 1
        self.steps_done += 1

    # -- choosing levels ------------------------------------------------------------------
    def _next_adjust(self, step: int) -> int:
        """The step count after which the first re-choice at or after step `step` happens."""
        w, every = self.cfg.warmup_steps, self.cfg.adjust_every
        return w if step <= w else w + -(-(step - w) // every) * every

    def _accumulating(self, step: int) -> bool:
        return self._next_adjust(step) - step < self.cfg.accumulate_steps

    def _maybe_adjust(self) -> dict[str, float]:
        s, cfg = self.steps_done, self.cfg
        if s < cfg.warmup_steps or (s - cfg.warmup_steps) % cfg.adjust_every or self.last_adjust == s:
            return {}
        if not cfg.adaptive:
            if s == cfg.warmup_steps:
                for layer in self.layers:
                    self._set_level(layer.name, self.default_level)
            self.last_adjust = s
            return {}
        table = self._shared_table()
        metrics = self._apply(table)
        self.accum, self.accum_count, self.last_adjust = {}, {}, s
        return metrics

    def _shared_table(self) -> np.ndarray:
        """[layers, columns] errors, each row measured by its owner, all-gathered; nan: not measured."""
        world, rank = self.ctx.world_size, self.ctx.rank
        mine = torch.full((len(self.layers), len(self.columns)), float("nan"), dtype=torch.float64)
        for layer in self.layers:
            if layer.index % world == rank and layer.name in self.accum:
                cols = [i for i, ok in enumerate(layer.available) if ok]
                row = errors([self.columns[i] for i in cols], self.accum[layer.name].view(layer.param.shape),
                             self._weight(layer))
                mine[layer.index, cols] = torch.tensor(row, dtype=torch.float64)
        if world == 1:
            return mine.numpy()
        gathered = self.ctx.comm.allgather(mine, label="lgreco.table")
        return torch.stack([gathered[l.index % world][l.index] for l in self.layers]).numpy() if self.layers \
            else mine.numpy()

    def _weight(self, layer: _Layer) -> torch.Tensor | None:
        """error_metric=adam: 1 / (sqrt(v) + eps), v AdamW's second moments of the layer (None before
        its first step: plain L2); l2: None."""
        if self.cfg.error_metric != "adam":
            return None
        v = self.ctx.optimizer.state.get(layer.param, {}).get("exp_avg_sq")
        eps = next(g["eps"] for g in self.ctx.optimizer.param_groups if any(p is layer.param for p in g["params"]))
        return None if v is None else 1.0 / (v.sqrt() + eps)

    def _apply(self, table: np.ndarray) -> dict[str, float]:
        world = self.ctx.world_size
        measured = [l for l in self.layers if not np.isnan(table[l.index]).all()]
        if not measured:
            return {}
        sizes = np.array([[wire_bytes(c, tuple(l.param.shape), world) if ok else np.inf
                           for c, ok in zip(self.columns, l.available)] for l in measured], dtype=np.float64)
        errs = np.stack([table[l.index] for l in measured])
        default = [self.columns.index(self.default_level)] * len(measured)
        choice = choose_levels(errs, sizes, default, self.cfg.alpha, self.cfg.delta)
        metrics = {"lgreco/error_total": choice.error, "lgreco/error_budget": choice.budget,
                   "lgreco/bytes_chosen": choice.bytes, "lgreco/bytes_default": choice.default_bytes}
        for i, (layer, col) in enumerate(zip(measured, choice.levels)):
            self._set_level(layer.name, self.columns[col])
            metrics[f"lgreco/plan/{layer.name}/error"] = float(errs[i, col])
        return metrics

    def _set_level(self, name: str, level: str) -> None:
        """The layer's new level; its residual carries over (it is in gradient space). A new PowerSGD
        rank starts a new per-layer PowerSGD, warm-started from the old Q's leading columns."""
        if self.level.get(name) == level:
            return
        self.level[name], self._plan_due = level, True
        old = self.psgd.pop(name, None)
        if family(level) == "powersgd":
            psgd = self.psgd[name] = new_compressor(level)
            psgd.seed = self.cfg.seed
            q = None if old is None else old._q.get(f"{name}/0")
            if q is not None and q.shape[1] >= psgd.rank:
                psgd._q[f"{name}/0"] = q[:, :psgd.rank].clone()

    def _plan_metrics(self) -> dict[str, Any]:
        """The plan now: per layer its level, bytes (all ranks, one sync) and bytes per value."""
        self._plan_due, world, out = False, self.ctx.world_size, {}
        for layer in self.layers:
            level, shape = self.level[layer.name], tuple(layer.param.shape)
            out.update({f"lgreco/plan/{layer.name}/level": level,
                        f"lgreco/plan/{layer.name}/bytes": float(wire_bytes(level, shape, world)),
                        f"lgreco/plan/{layer.name}/bytes_per_value": bytes_per_value(level, shape)})
        return out

    def levels(self) -> dict[str, str]:
        """Layer -> its level now (the same on every rank)."""
        return dict(self.level)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        warm_q = {name: p._q[f"{name}/0"].clone() for name, p in self.psgd.items() if f"{name}/0" in p._q}
        return {"steps_done": self.steps_done, "last_adjust": self.last_adjust, "levels": dict(self.level),
                "warm_q": warm_q}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done, self.last_adjust = state["steps_done"], state["last_adjust"]
        for name, level in state["levels"].items():
            self._set_level(name, level)
        for name, q in state["warm_q"].items():
            self.psgd[name]._q = {f"{name}/0": q.clone()}

    def local_state_dict(self) -> dict[str, Any]:
        return {"residuals": {n: r.clone() for n, r in self.residual.items()},
                "accum": {k: v.clone() for k, v in self.accum.items()}, "accum_count": dict(self.accum_count)}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        self.residual = {n: r.clone() for n, r in state.get("residuals", {}).items() if n in self.level}
        self.accum = {k: v.clone() for k, v in state.get("accum", {}).items()}
        self.accum_count = dict(state.get("accum_count", {}))


register("lgreco", LGrecoConfig, LGrecoWorker)
