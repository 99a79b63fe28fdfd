"""gnnpipe: pipelined layer-parallel full-graph GNN training (GNNPipe, Chen et al. 2023).

S = num_workers / D stages, each holding a run of consecutive layers (`Layout.parts`: stage s
builds `{"layers": [a_s, b_s]}`; the first also the input projection, the last the classifier)
and computing them for the whole graph; the graph's vertices are cut into `chunks` dependent
chunks that flow through the stages (strategies/gnn/engine.py). One coordinator step = one epoch = one
optimizer step. Hybrid (`data_parallel` = D > 1): the graph is partitioned into D parts
(`partitioner`: METIS, or RCM blocks); ranks s*D .. s*D+D-1 hold stage s for parts 0..D-1 (one
state key per stage, a `stage` group each) and sum their gradients. The ways of a stage cut
their parts into the same number of chunks and run them in the same order; per chunk and per
layer they exchange the halo rows they read from each other and, in the backward pass, those
rows' gradients (strategies/gnn/hybrid.py), so a way's tables hold its own rows only and, with one chunk,
the gradient is the whole-graph model's. Stale-row convention (as for a way's own rows): a row
of a chunk not yet computed this epoch is last epoch's value; its gradient is dropped, or with
`stale_gradients` applied in the next epoch.

Training techniques (each an option; what it fixes): `shuffle_chunks` (the chunk order is
reshuffled every epoch from a seed all stages share, so no chunk always reads the oldest
history: spreads the staleness bias over the vertices), `warmup_epochs` (the first epochs run
as one chunk: no staleness while the embeddings move fastest, when history is most wrong),
`stale_gradients` (the gradient a historical row receives is applied to its chunk in the next
epoch, as PipeGCN does, instead of being dropped: removes the gradient's bias once the
parameters settle; it helped GCNII and hurt residual GCN in our runs, so it is off by default).
Run metrics: `graph/edge_cut_fraction` and `graph/halo_rows` of the D-way partition. Layers are split
into stages by a cost model (`stage_layers` overrides it): conv layers cost 1, the input
projection input_dim / width / 2 (one dense layer, no aggregation), the classifier nothing.

Checkpoints: the stage's parameters, optimizer and epoch (state key `stage_<s>`); the
historical tables are per rank (`local_state_dict`; a replacement starts from zeros).
`elastic=False`: a lost stage must be replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raylane.strategies.gnn import common
from raylane.strategies.base import Layout, WorkerContext, WorkerStrategy, register
from raylane.strategies.gnn.engine import Peers, StageEngine
from raylane.strategies.gnn.hybrid import Exchange, WayPlan
from raylane.strategies.gnn.partition import locality_rank, partition, partition_stats, split_blocks
from raylane.validation import check


@dataclass
class GnnPipeConfig:
    name: str = "gnnpipe"
    chunks: int = 4                    # C: dependent chunks per part
    data_parallel: int = 1             # D: graph-parallel ways per stage (hybrid); stages = num_workers / D
    shuffle_chunks: bool = True        # a new chunk order each epoch, from a seed every stage shares
    warmup_epochs: int = 0             # the first epochs as one chunk (no historical embeddings)
    stale_gradients: bool = False      # historical rows' gradients reach their chunks in the next epoch
    stage_layers: list[int] | None = None  # layers per stage (null: the cost model fills it in at validation)
    partitioner: str = "metis"         # the hybrid's D parts: metis | rcm (reverse Cuthill-McKee blocks)
    best_val_every: int = 1            # evaluate every N epochs for test accuracy at the best validation (0: off)
    patience: int = 0                  # stop after N evaluations without a better validation accuracy (0: never)

    def validate(self, prefix: str) -> None:
        common.check_graph_options(self, prefix)
        check(self.chunks >= 1, f"{prefix}.chunks", self.chunks, "must be >= 1")
        check(self.data_parallel >= 1, f"{prefix}.data_parallel", self.data_parallel, "must be >= 1")
        check(self.warmup_epochs >= 0, f"{prefix}.warmup_epochs", self.warmup_epochs, "must be >= 0")
        check(self.stage_layers is None or all(n >= 1 for n in self.stage_layers), f"{prefix}.stage_layers",
              self.stage_layers, "every stage needs >= 1 layer")

    def check_run(self, run: Any) -> None:
        common.check_graph_run(run, "gnnpipe")
        w, d, layers = run.cluster.num_workers, self.data_parallel, run.model.n_layer
        check(w % d == 0, "strategy.data_parallel", d, f"must divide cluster.num_workers={w}")
        check(w // d <= layers, "cluster.num_workers", w,
              f"gnnpipe needs a layer per stage: num_workers / data_parallel = {w // d} stages > "
              f"model.n_layer={layers}")
        if self.stage_layers is None:  # resolved once here, so every process builds the same parts
            self.stage_layers = [b - a for a, b in stage_split(layers, w // d, INPUT_COST)]
        check(len(self.stage_layers) == w // d and sum(self.stage_layers) == layers, "strategy.stage_layers",
              self.stage_layers, f"must list {w // d} stages summing to model.n_layer={layers}")

    def warn_run(self, run: Any) -> list[str]:
        """A run that ends inside the learning-rate warm-up (a gnnpipe step is an epoch: runs are short)."""
        if run.optim.schedule == "constant" or run.train.steps > run.optim.warmup_steps:
            return []
        return [f"train.steps={run.train.steps} <= optim.warmup_steps={run.optim.warmup_steps}: the whole run is in "
                f"the learning-rate warm-up (a gnnpipe step is one epoch); use a smaller optim.warmup_steps"]


INPUT_COST = 0.5  # the input projection, in conv layers


def stage_split(n_layer: int, stages: int, input_cost: float = 0.0,
                given: list[int] | None = None) -> list[tuple[int, int]]:
    """[a, b) per stage: consecutive runs balancing the stage costs (conv = 1, the first stage also
    `input_cost`), or the `given` layer counts."""
    counts = list(given) if given else None
    if counts is None:
        counts = [0] * stages
        for _ in range(n_layer):  # greedy: each layer to the cheapest stage, keeping stages contiguous
            costs = [counts[s] + (input_cost if s == 0 else 0) for s in range(stages)]
            counts[min(range(stages), key=lambda s: (costs[s], -s))] += 1
        for s in range(stages):  # every stage at least one layer
            if counts[s] == 0:
                donor = max(range(stages), key=lambda t: counts[t])
                counts[donor] -= 1
                counts[s] += 1
    bounds, a = [], 0
    for n in counts:
        bounds.append((a, a + n))
        a += n
    return bounds


class GnnPipeWorker(WorkerStrategy):
    replicas_identical = False
    full_graph = True  # trains a GNN on ctx.data, a whole graph (config.validate checks the pairing)
    eval_views = ("model", "test")  # model: validation vertices; test: test vertices

    @classmethod
    def layout(cls, cfg: GnnPipeConfig, world_size: int) -> Layout:
        d = cfg.data_parallel
        s_count = world_size // d
        assert cfg.stage_layers is not None and len(cfg.stage_layers) == s_count, \
            "GnnPipeConfig.check_run resolves stage_layers (config.validate calls it)"
        bounds = stage_split(sum(cfg.stage_layers), s_count, given=cfg.stage_layers)
        keys = tuple(f"stage_{r // d}" for r in range(world_size))
        parts = tuple({"layers": list(bounds[r // d])} for r in range(world_size))
        groups = {"stage": tuple(tuple(range(s * d, s * d + d)) for s in range(s_count))} if d > 1 else {}
        return Layout(keys, parts, groups, elastic=False)

    def __init__(self, cfg: GnnPipeConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        g, d = ctx.data, cfg.data_parallel
        self.stage, self.way = divmod(ctx.rank, d)
        self.stages = ctx.world_size // d
        self.owner = partition(g.edge_index, g.num_vertices, d, cfg.partitioner)
        self.partition_metrics = {f"graph/{k}": v for k, v in partition_stats(g.edge_index, self.owner).items()}
        parts = [torch.nonzero(self.owner == q).flatten() for q in range(d)]
        order = locality_rank(g.edge_index, g.num_vertices)
        chunks = min(cfg.chunks, *(len(p) for p in parts))  # every way the same count: they run in step
        self.peers = Peers(prev=ctx.rank - d if self.stage > 0 else None,
                           next=ctx.rank + d if self.stage < self.stages - 1 else None)
        self.scale = 1.0 / max(1, int(g.train_mask.sum()))
        self.engine = self._engine([split_blocks(p, order, chunks) for p in parts])
        self.whole = [[p] for p in parts]  # one chunk per way: warmup epochs and inference
        self.warm = self._engine(self.whole) if cfg.warmup_epochs > 0 else None
        if self.warm is not None:  # one history for both
            self.warm.tables, self.warm.stamps = self.engine.tables, self.engine.stamps
        self.epoch = 0

    def _engine(self, ways_chunks: list[list[torch.Tensor]]) -> StageEngine:
        """A stage engine over this way's chunks (`ways_chunks[way]`); the hybrid's exchange plan
        needs every way's chunks."""
        g, ctx = self.ctx.data, self.ctx
        exchange = None
        if self.cfg.data_parallel > 1:
            ei, _ = ctx.model.prepare_edges(g.edge_index, g.num_vertices)
            own = torch.sort(torch.cat(ways_chunks[self.way])).values
            plan = WayPlan(self.way, ways_chunks, ei, g.num_vertices, self.owner,
                           lambda ids: torch.searchsorted(own, ids))
            exchange = Exchange(plan, ctx.comms["stage"])
        return StageEngine(ctx.model, g, ctx.comm, self.peers, ways_chunks[self.way], self.owner, self.way,
                           self.scale, exchange, self.cfg.stale_gradients)

    def set_comm(self, comm: Any) -> None:
        super().set_comm(comm)
        for engine in (self.engine, self.warm):  # the re-formed groups (after a fault)
            if engine is not None:
                engine.comm = comm
                if engine.exchange is not None:
                    engine.exchange.comm = self.ctx.comms["stage"]

    # -- one epoch ----------------------------------------------------------------------------
    def make_batch(self, sample_offset: int) -> None:
        return None  # the whole graph: ctx.data

    def chunk_order(self, epoch: int, chunks: int) -> list[int]:
        if not self.cfg.shuffle_chunks:
            return list(range(chunks))
        g = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + epoch)
        return torch.randperm(chunks, generator=g).tolist()

    def train_step(self, batch: Any, lr: float) -> dict[str, float]:
        ctx, epoch = self.ctx, self.epoch + 1  # self.epoch advances only once the step is applied
        engine = self.warm if self.warm is not None and epoch <= self.cfg.warmup_epochs else self.engine
        ctx.optimizer.zero_grad(set_to_none=True)
        sent = dict(engine.sent)
        res = engine.train_epoch(self.chunk_order(epoch, len(engine.chunks)), epoch)
        if self.cfg.data_parallel > 1:
            common.allreduce_grads(ctx, ctx.comms["stage"])
        norm = common.step_optimizer(ctx, lr, ctx.comm, self.cfg.data_parallel)
        self.epoch = epoch
        train = int(ctx.data.train_mask[engine.mine].sum()) if ctx.model.last else 0
        return {"loss": res["loss"], "loss_part": res["loss"], "samples": train, "tokens": train,
                "grad_norm": norm, "stage": self.stage, "fwd_bytes": engine.sent["next"] - sent["next"],
                "bwd_bytes": engine.sent["prev"] - sent["prev"], "stale_reads": res["stale_reads"],
                "staleness_epochs": res["staleness_epochs"], **self.partition_metrics}

    def evaluate(self, num_shards: int) -> dict[str, tuple[float, int]]:
        """Exact inference: the part as one chunk, through the pipeline (an engine of its own)."""
        return common.evaluation(self._engine(self.whole).infer(common.masks(self.ctx.data)))

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])

    def local_state_dict(self) -> dict[str, Any]:
        return {"tables": {str(k): t.clone() for k, t in self.engine.tables.items()},
                "stamps": {str(k): t.clone() for k, t in self.engine.stamps.items()}}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        for k, t in state.get("tables", {}).items():
            self.engine.tables[int(k)].copy_(t)
            self.engine.stamps[int(k)].copy_(state["stamps"][k])


class GnnPipeDriver(common.FullGraphDriver):
    def summarise(self, results: list[dict]) -> None:
        stages = max(r["stage"] for r in results) + 1
        out = results[0]
        for s in range(stages - 1):  # boundary s: stage s -> s+1 forward, s+1 -> s backward
            out[f"gnnpipe/boundary{s}_bytes"] = sum(r["fwd_bytes"] for r in results if r["stage"] == s) + \
                sum(r["bwd_bytes"] for r in results if r["stage"] == s + 1)
        reads = sum(r["stale_reads"] for r in results)
        out["gnnpipe/staleness_epochs"] = sum(r["staleness_epochs"] * r["stale_reads"] for r in results) / max(1, reads)
        out["gnnpipe/stale_reads"] = reads


register("gnnpipe", GnnPipeConfig, GnnPipeWorker, GnnPipeDriver)
