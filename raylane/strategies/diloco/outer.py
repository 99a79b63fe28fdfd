"""DiLoCo's outer state: global parameters per fragment, the outer optimizer, syncs in flight.

Per fragment p, on every rank in the same order:
1. `start(p, step, merge_step)`: the outer gradient global_p - local_p (flat, fp32) starts its
   compressed all-reduce (mean; reduced in fp32 by `quantized_allreduce`) asynchronously;
2. `finish(sync)` after `merge_step`: waits for it, steps the outer optimizer (SGD with
   Nesterov momentum, identical on every rank) on global_p, then merges
   local_p = alpha * local_p + (1 - alpha) * global_p.
Global parameters start as the model's (every replica starts alike) and stay bit-identical
across ranks, because every rank decompresses the same gathered payloads.

With `strategy.outer.aggregator` set (`OuterRule`), step 1 gathers instead: every replica's compressed
outer gradient reaches every rank (compressed_allgather; (W-1) payloads sent per rank instead of the
all-reduce's 2(W-1)/W), and `finish` aggregates the (W, d) rows with the robust rule (non-finite rows
dropped, f lowered: blocks/aggregators/round.py) before the outer step. The mean rule (and
trimmed_mean with nothing trimmed) reduces the rows as the all-reduce does (blocks/aggregators/base.py
`mean_rows`: fp32, in rank order, / W), so with compression none it equals plain DiLoCo bit for bit. A Byzantine plan's row-forging modes (alie, ipm, mimic and the adaptive ones)
replace the colluders' rows once gathered (the rushing adversary: chaos.ByzantineStep.forge_rows);
wire modes corrupt the colluder's payload as it is sent.

`state_dict()` waits for the syncs in flight and keeps their reduced outer gradients, so a
restored run merges the same values at the same steps. After the group is re-formed
(`set_comm`) the syncs in flight on the old group are lost; finishing one raises: restore a
checkpoint (recovery does so for strategies whose replicas differ). A compressor that cannot
run (inf or nan outer gradient) raises from `finish`; nothing is sent in full precision instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from raylane.comm import (CompressionConfig, Communicator, Compressor, compressed_allgather,
                          expected_bytes_sent, quantized_allreduce)
from raylane.strategies.blocks.aggregators.round import aggregate


def _scatter(dst: torch.Tensor, spans: list[tuple[int, int]], src: torch.Tensor) -> None:
    """src (the concatenation of dst's `spans`, in order) back into those spans."""
    offset = 0
    for a, b in spans:
        dst[a:b].copy_(src[offset:offset + b - a])
        offset += b - a


@dataclass
class Fragment:
    index: int
    names: list[str]
    local: list[torch.nn.Parameter]  # the model's own parameters
    global_: list[torch.Tensor]  # the outer (global) parameters

    def __post_init__(self) -> None:
        self.starts = [0]  # each tensor's offset in the fragment's flat vector, and the total
        for p in self.local:
            self.starts.append(self.starts[-1] + p.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]


@dataclass
class Sync:
    fragment: int
    start_step: int
    merge_step: int
    outer_grad: torch.Tensor  # flat fp32: this rank's before the all-reduce, the mean after
    bytes_sent: int
    # per collective: (spans in the flat vector, None for all of it; the tensor sent; its handle); [] once
    # waited for (or restored)
    parts: list = field(default_factory=list)
    lost: bool = False
    rows: torch.Tensor | None = None  # gathered (W, d) rows (robust outer sync), until aggregated


@dataclass
class OuterRule:
    """A robust outer sync: the pipeline, its state, and where this step's Byzantine plan is read."""

    pipeline: Any  # blocks.aggregators.pipeline.Pipeline
    byzantine: Any  # () -> this step's chaos.ByzantineStep or None
    row_of: Any  # world rank -> its row in the outer group (its replica)
    measure: bool = False  # log the rule's metrics (rank 0)
    state: dict | None = None


class OuterSync:
    def __init__(self, parts: list[list[tuple[str, torch.nn.Parameter]]], cfg: Any, compressor: Compressor,
                 comm: Communicator, rule: OuterRule | None = None):
        self.fragments = [Fragment(i, [n for n, _ in part], [p for _, p in part],
                                   [p.detach().clone() for _, p in part]) for i, part in enumerate(parts)]
        self.alpha, self.compressor, self.comm = cfg.merge_alpha, compressor, comm
        self.optimizer = torch.optim.SGD([{"params": f.global_} for f in self.fragments], lr=cfg.outer_lr,
                                         momentum=cfg.outer_momentum,
                                         nesterov=cfg.outer_nesterov and cfg.outer_momentum > 0)
        self.in_flight: list[Sync] = []
        self._eval_identity = CompressionConfig("none").build()
        self.rule = rule
        self.metrics: dict[str, float] = {}  # the last aggregation's (robust outer sync)
        self.plans: list = []  # per fragment: a FragmentPlan (outer.compression: lgreco), else empty
        self.plan_metrics: dict[str, float] = {}  # the last re-plan's
        self._bytes: dict[int, int] = {}  # fragment -> bytes_per_sync

    # -- syncs ------------------------------------------------------------------------
    def bytes_per_sync(self, fragment: int) -> int:
        """Payload bytes this rank sends for one sync of `fragment` (the compressors' formulas; kept
        until the group or the fragment's plan changes)."""
        if fragment not in self._bytes:
            self._bytes[fragment] = self._count_bytes(fragment)
        return self._bytes[fragment]

    def _count_bytes(self, fragment: int) -> int:
        collective = "compressed_allgather" if self.rule is not None else "quantized_allreduce"
        if self.plans:
            plan, frag = self.plans[fragment], self.fragments[fragment]
            return sum(expected_bytes_sent(collective, sum(frag.local[i].numel() for i in idx), torch.float32,
                                           self.comm.world_size, self.comm.rank,
                                           self.compressor if lv == plan.default else plan.compressor(lv),
                                           self.comm.backend) for lv, idx in plan.groups())
        return expected_bytes_sent(collective, self.fragments[fragment].numel, torch.float32,
                                   self.comm.world_size, self.comm.rank, self.compressor, self.comm.backend)

    @torch.no_grad()
    def start(self, fragment: int, step: int, merge_step: int) -> Sync:
        frag = self.fragments[fragment]
        assert all(s.fragment != fragment for s in self.in_flight), f"fragment {fragment} is already in flight"
        if frag.numel == 0:  # a shard of a multi-rank replica may hold none of it: so do its outer peers
            sync = Sync(fragment, step, merge_step, torch.zeros(0), 0)
            self.in_flight.append(sync)
            return sync
        pieces = [(g.float() - p.float()).reshape(-1) for p, g in zip(frag.local, frag.global_)]
        plan = self.plans[fragment] if self.plans else None
        if plan is not None:
            if plan.due():
                self.plan_metrics = plan.replan(pieces, self.comm)
                self._bytes.pop(fragment, None)
            plan.syncs += 1
        delta = torch.cat(pieces)
        sync = Sync(fragment, step, merge_step, delta, self.bytes_per_sync(fragment))
        key = f"diloco/fragment{fragment}"
        groups = plan.groups() if plan is not None else [(None, list(range(len(pieces))))]
        for level, idx in groups:
            whole = len(idx) == len(pieces)
            flat = delta if whole else torch.cat([pieces[i] for i in idx])
            c = self.compressor if plan is None or level == plan.default else plan.compressor(level)
            k = key if plan is None or level == plan.default else f"{key}/{level}"
            if self.rule is not None:
                handle = compressed_allgather(self.comm, flat, c, key=k, async_op=True)
            else:
                handle = quantized_allreduce(self.comm, flat, c, op="avg", key=k, async_op=True)
            sync.parts.append((None if whole else self._spans(frag, idx), flat, handle))
        self.in_flight.append(sync)
        return sync

    @staticmethod
    def _spans(frag: Fragment, idx: list[int]) -> list[tuple[int, int]]:
        """(start, end) in the fragment's flat vector of each tensor in `idx`."""
        return [(frag.starts[i], frag.starts[i + 1]) for i in idx]

    def due(self, step: int) -> list[Sync]:
        return [s for s in self.in_flight if s.merge_step <= step]

    def resolve(self, sync: Sync) -> None:
        """Wait for `sync`'s all-reduce; afterwards `outer_grad` holds the mean."""
        if sync.lost:
            raise RuntimeError(f"diloco: the outer sync of fragment {sync.fragment} started at step "
                               f"{sync.start_step} was lost when the process group was re-formed; restore a "
                               "checkpoint")
        if not sync.parts:
            return
        rows = None
        for spans, flat, handle in sync.parts:
            got = handle.wait()
            if self.rule is not None:
                if spans is None:
                    rows = torch.stack(got)
                    continue
                rows = torch.empty(len(got), sync.outer_grad.numel()) if rows is None else rows
                for r, t in enumerate(got):
                    _scatter(rows[r], spans, t)
            elif spans is not None:  # reduced in place in `flat`: back to its tensors' places
                _scatter(sync.outer_grad, spans, flat)
        sync.parts = []
        sync.rows = rows if self.rule is not None else None

    @torch.no_grad()
    def finish(self, sync: Sync) -> float:
        """Outer step and merge of `sync`'s fragment; returns the norm of the mean outer gradient."""
        self.resolve(sync)
        self.in_flight.remove(sync)
        if sync.rows is not None:
            sync.outer_grad, sync.rows = self._aggregate(sync.rows), None
        frag = self.fragments[sync.fragment]
        if not frag.global_:
            return 0.0
        for g, d in zip(frag.global_, torch.split(sync.outer_grad, [g.numel() for g in frag.global_])):
            g.grad = d.view_as(g).to(g.dtype)
        self.optimizer.step()
        for g, p in zip(frag.global_, frag.local):
            g.grad = None
            if self.alpha == 0:
                p.copy_(g)
            else:
                p.mul_(self.alpha).add_(g.to(p.dtype), alpha=1 - self.alpha)
        return float(sync.outer_grad.norm())

    def _aggregate(self, G: torch.Tensor) -> torch.Tensor:
        """The robust rule on the gathered rows (the colluders' rows forged first, when a plan attacks)."""
        rule = self.rule
        byz = rule.byzantine()
        bad: list[int] = []
        if byz is not None:
            G = byz.forge_rows(G, rule.row_of, lambda M: aggregate(rule.pipeline, M, rule.state, [], False)[0].vector)
            bad = sorted({rule.row_of(r) for r in byz.ranks})
        res, self.metrics = aggregate(rule.pipeline, G, rule.state, bad, rule.measure, prefix="outer")
        rule.state = res.state
        return res.vector.to(torch.float32)

    def set_comm(self, comm: Communicator) -> None:
        self.comm, self._bytes = comm, {}
        for plan in self.plans:
            plan.world = comm.world_size
        for sync in self.in_flight:
            sync.lost, sync.parts = True, []

    # -- measures and views -----------------------------------------------------------
    @torch.no_grad()
    def drift(self) -> float:
        """Norm of local - global over every parameter of this replica."""
        sq = [(p.float() - g.float()).pow(2).sum() for f in self.fragments for p, g in zip(f.local, f.global_)]
        return float(torch.stack(sq).sum().sqrt())

    @contextlib.contextmanager
    def swapped(self, view: str) -> Iterator[None]:
        """The model holds the `view` parameters ("global" or "replica_avg") for the duration."""
        params = [p for f in self.fragments for p in f.local]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            if view == "global":
                sources = [g for f in self.fragments for g in f.global_]
            else:
                assert view == "replica_avg", view
                flat = torch.cat([p.detach().float().reshape(-1) for p in params])
                compressed_allgather(self.comm, flat, self._eval_identity, op="avg", key="diloco/eval")
                sources = list(torch.split(flat, [p.numel() for p in params]))
            for p, s in zip(params, sources):
                p.copy_(s.view_as(p))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        for sync in self.in_flight:
            self.resolve(sync)
        return {"fragments": [f.names for f in self.fragments],
                "global": [[g.detach().clone() for g in f.global_] for f in self.fragments],
                "optimizer": self.optimizer.state_dict(),
                "in_flight": [{"fragment": s.fragment, "start_step": s.start_step, "merge_step": s.merge_step,
                               "outer_grad": s.outer_grad.clone(), "bytes_sent": s.bytes_sent,
                               "rows": None if s.rows is None else s.rows.clone()}
                              for s in self.in_flight],
                "compressor": self.compressor.state_dict(),
                "rule": None if self.rule is None else self.rule.state,
                "plans": [plan.state_dict() for plan in self.plans]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [f.names for f in self.fragments]
        if state["fragments"] != names:
            raise ValueError(f"diloco: the checkpoint's fragments {state['fragments']} differ from this run's "
                             f"{names}; resume with the same strategy.fragments and fragment_pattern")
        for f, saved in zip(self.fragments, state["global"]):
            for g, s in zip(f.global_, saved):
                g.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
        device = self.fragments[0].global_[0].device
        self.in_flight = [Sync(s["fragment"], s["start_step"], s["merge_step"], s["outer_grad"].to(device).clone(),
                               s["bytes_sent"], rows=None if s.get("rows") is None else s["rows"].clone())
                          for s in state["in_flight"]]
        self.compressor.load_state_dict(state["compressor"])
        if self.rule is not None:
            self.rule.state = state.get("rule")
        for plan, saved in zip(self.plans, state.get("plans") or []):
            plan.load_state_dict(saved)
        self._bytes = {}
