"""lgreco: layer-wise adaptive gradient compression (L-GreCo, Markov et al., MLSys 2024).

ddp's bucketed, backward-overlapped sync (ddp.py) with a compression level per layer: as a
compressible layer's gradient is ready, g + its error-feedback residual goes through its level's
collective (lgreco_levels.py), async on the comm layer's thread; small layers (fewer than
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

State: replica (the same on every rank) - step count, levels, PowerSGD Q per layer;
local (`local_state_dict`, per rank) - residuals, accumulations. Metrics (rank 0's):
lgreco/compressed_layers, lgreco/bytes_per_step_planned (of the compressible layers at their levels, all
ranks together, from the formulas the Communicator counts with); at a
re-choice lgreco/error_total, error_budget, bytes_chosen, bytes_default and per layer
lgreco/<param>/ratio (full precision / chosen bytes), /bytes, /error, /level_index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raylane.comm import ErrorFeedback, compressed_allgather, powersgd_allreduce, quantized_allreduce
from raylane.comm.powersgd import PowerSGD
from raylane.strategies.base import WorkerContext, register
from raylane.strategies.ddp import DDPWorker, _Bucket, clip_and_step, group_buckets
from raylane.strategies.lgreco_config import LGrecoConfig
from raylane.strategies.lgreco_dp import choose_levels
from raylane.strategies.lgreco_levels import applies, compressor, errors, family, in_range, wire_bytes


@dataclass
class _Layer:
    name: str
    param: torch.nn.Parameter
    index: int  # among the compressible layers
    available: list[bool]  # per table column


@dataclass
class _Pending:
    """One layer's sync in this step, committed only once every collective of the step returned."""

    corrected: torch.Tensor
    psgd: PowerSGD | None = None
    sent: torch.Tensor | None = None


class LGrecoWorker(DDPWorker):
    replicas_identical = True

    def __init__(self, cfg: LGrecoConfig, ctx: WorkerContext):
        self.columns = cfg.candidates()
        self.default_level = cfg.default()
        if self.default_level not in self.columns:
            self.columns.append(self.default_level)
        self.layers = self._plan(cfg, ctx.model, ctx.world_size)
        self._layer_of_param = {id(layer.param): layer for layer in self.layers}
        self._layer_of_bucket: dict[int, _Layer] = {}
        super().__init__(cfg, ctx)
        self.level = {layer.name: "none" for layer in self.layers}
        self.ef = {layer.name: ErrorFeedback(compressor("none")) for layer in self.layers}
        self.warm_q: dict[str, torch.Tensor] = {}
        self.steps_done, self.last_adjust = 0, -1
        self.accum: dict[str, torch.Tensor] = {}
        self.accum_count: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}

    def _plan(self, cfg: LGrecoConfig, model: torch.nn.Module, world: int) -> list[_Layer]:
        layers = []
        for name, p in model.named_parameters():
            if not p.requires_grad or p.numel() < cfg.min_numel or not applies(self.default_level, p.shape):
                continue
            rate = p.numel() * 4 / compressor(self.default_level).payload_bytes(p.shape, torch.float32)
            if rate >= cfg.min_compression_rate:
                ok = [c == self.default_level or (applies(c, p.shape)
                                                  and in_range(c, self.default_level, p.shape, world, cfg.level_range))
                      for c in self.columns]
                layers.append(_Layer(name, p, len(layers), ok))
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
        self._pending = {}
        ctx.optimizer.zero_grad(set_to_none=False)
        loss = ctx.loss(batch)
        self.sync_gradients(loss.backward)
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
        pending = self._pending[name] = _Pending(self.ef[name].corrected(bucket.buffer, name).clone())
        bucket.buffer.copy_(pending.corrected)
        kind = family(level)
        if kind == "topk":
            return compressed_allgather(comm, bucket.buffer, compressor(level), None, key=name, async_op=True)
        if kind == "powersgd":
            pending.psgd = PowerSGD(int(level.split(":")[1]), warm_start=True, seed=self.cfg.seed)
            if name in self.warm_q:
                pending.psgd.load_state_dict({"q": {f"{name}/0": self.warm_q[name]}})
            return powersgd_allreduce(comm, [bucket.buffer.view(layer.param.shape)], pending.psgd, "avg", key=name,
                                      async_op=True)
        return quantized_allreduce(comm, bucket.buffer, compressor(level), "avg", key=name, async_op=True)

    def _reduced(self, bucket: _Bucket, result: Any) -> None:
        layer = self._layer_of_bucket.get(id(bucket))
        if layer is None:
            return
        pending, level = self._pending[layer.name], self.level[layer.name]
        kind = family(level)
        if kind == "topk":  # every rank's decompressed top-k: average in rank order, in fp32
            total = result[0].float().clone()
            for t in result[1:]:
                total.add_(t.float())
            bucket.buffer.copy_(total.div_(len(result)).view(-1))
            pending.sent = result[self.ctx.comm.rank]
        elif kind == "powersgd":  # PowerSGD's residual: what the shared approximation left out
            pending.sent = bucket.buffer.clone()
        elif kind == "quant":  # the chunks it sent are the whole tensor's blocks
            c = compressor(level)
            pending.sent = c.decompress(c.compress(pending.corrected))
        else:
            pending.sent = pending.corrected

    def _commit(self) -> None:
        accumulate = self.cfg.adaptive and self._accumulating(self.steps_done + 1)
        world, rank = self.ctx.world_size, self.ctx.rank
        for layer in self.layers:
            name, pending = layer.name, self._pending.pop(layer.name)
            if self.level[name] == "none":
                self.ef[name].residuals.pop(name, None)
            else:
                self.ef[name].keep(name, pending.corrected, pending.sent.view_as(pending.corrected))
            if pending.psgd is not None:
                self.warm_q[name] = pending.psgd.state_dict()["q"][f"{name}/0"]
            if accumulate and layer.index % world == rank:
                acc = self.accum.get(name)
                self.accum[name] = pending.corrected if acc is None else acc + pending.corrected
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
                row = errors(self.columns, self.accum[layer.name].view(layer.param.shape), self._weight(layer))
                mine[layer.index] = torch.tensor([e if ok else float("nan") for e, ok in zip(row, layer.available)],
                                                 dtype=torch.float64)
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
        full = [wire_bytes("none", tuple(l.param.shape), world) for l in measured]
        for i, (layer, col) in enumerate(zip(measured, choice.levels)):
            self._set_level(layer.name, self.columns[col])
            metrics.update({f"lgreco/{layer.name}/ratio": full[i] / sizes[i, col] if sizes[i, col] else 1.0,
                            f"lgreco/{layer.name}/bytes": float(sizes[i, col]),
                            f"lgreco/{layer.name}/error": float(errs[i, col]),
                            f"lgreco/{layer.name}/level_index": col})
        return metrics

    def _set_level(self, name: str, level: str) -> None:
        """A new compressor for the layer; its residual carries over (it is in gradient space)."""
        if self.level.get(name) != level:
            ef = ErrorFeedback(compressor(level))
            ef.residuals = self.ef[name].residuals if name in self.ef else {}
            self.ef[name], self.level[name] = ef, level

    def levels(self) -> dict[str, str]:
        """Layer -> its level now (the same on every rank)."""
        return dict(self.level)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "last_adjust": self.last_adjust, "levels": dict(self.level),
                "warm_q": {k: v.clone() for k, v in self.warm_q.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done, self.last_adjust = state["steps_done"], state["last_adjust"]
        for name, level in state["levels"].items():
            self._set_level(name, level)
        self.warm_q = {k: v.clone() for k, v in state["warm_q"].items()}

    def local_state_dict(self) -> dict[str, Any]:
        return {"residuals": {n: ef.residuals[n].clone() for n, ef in self.ef.items() if n in ef.residuals},
                "accum": {k: v.clone() for k, v in self.accum.items()}, "accum_count": dict(self.accum_count)}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        residuals = state.get("residuals", {})
        for name, ef in self.ef.items():
            ef.residuals = {name: residuals[name].clone()} if name in residuals else {}
        self.accum = {k: v.clone() for k, v in state.get("accum", {}).items()}
        self.accum_count = dict(state.get("accum_count", {}))


register("lgreco", LGrecoConfig, LGrecoWorker)
