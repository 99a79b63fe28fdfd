"""What the full-graph GNN strategies (gnnpipe, graph_parallel) share.

- `check_graph_run(run_cfg)`: a GNN model (model=gcn | sage | gcnii) on a graph dataset
  (data=csbm | karate | graph), checked at config validation.
- `FullGraphDriver`: one round = one epoch on every worker; the loss of the whole graph is the sum
  of the ranks' `loss_part` (each rank holds the loss of its vertices, scaled by 1 / train vertices),
  copied to every rank's result, so that the coordinator's average is the graph's loss.
- `step_optimizer`: clip by the norm of the whole model's gradient (summed over the ranks that
  hold different parameters), set the lr, step.
- `evaluation(...)`: the worker's evaluation shape from per-mask (loss sum, correct, vertices):
  view `model` = validation vertices (eval/loss, eval/accuracy), view `test` = test vertices.
"""

from __future__ import annotations

from typing import Any

import torch

from raylane.strategies.base import DriverStrategy, WorkerCalls, WorkerContext
from raylane.validation import check

GNN_MODELS = ("gcn", "sage", "gcnii")
GRAPH_DATA = ("csbm", "karate", "graph")


def check_graph_run(run_cfg: Any, strategy: str) -> None:
    check(run_cfg.model.name in GNN_MODELS, "model.name", run_cfg.model.name,
          f"strategy={strategy} trains a GNN: choose one of {list(GNN_MODELS)}")
    check(run_cfg.data.name in GRAPH_DATA, "data.name", run_cfg.data.name,
          f"strategy={strategy} trains on a whole graph: choose one of {list(GRAPH_DATA)}")


class FullGraphDriver(DriverStrategy):
    """Every worker trains one epoch; the graph's loss (sum of `loss_part`) goes to every result."""

    def run_round(self, workers: WorkerCalls, step: int, sample_offset: int, lr: float) -> list[dict]:
        results = workers.get(workers.call("train_step", sample_offset, lr))
        total = sum(r.pop("loss_part") for r in results)
        for r in results:
            r["loss"] = total
        self.summarise(results)
        return results

    def summarise(self, results: list[dict]) -> None:
        """Strategy metrics across ranks, into rank 0's result (the coordinator logs its `/` keys)."""


def step_optimizer(ctx: WorkerContext, lr: float, norm_comm: Any = None, copies: int = 1) -> float:
    """Clip by the global grad norm (squared norms summed over `norm_comm`, divided by `copies`:
    ranks holding the same parameters), set the lr, step the optimizer; returns the norm."""
    params = [p for p in ctx.model.parameters() if p.grad is not None]
    sq = torch.zeros(1)
    for p in params:
        sq += p.grad.detach().pow(2).sum()
    if ctx.grad_clip > 0 and norm_comm is not None and norm_comm.world_size > 1:
        norm_comm.allreduce(sq, op="sum")
    norm = float(sq.div_(copies).sqrt())
    if ctx.grad_clip > 0 and norm > ctx.grad_clip:
        for p in params:
            p.grad.mul_(ctx.grad_clip / (norm + 1e-6))
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    ctx.optimizer.step()
    return norm


def allreduce_grads(ctx: WorkerContext, comm: Any) -> None:
    """Sum the gradients over `comm` (one flat buffer; a missing gradient counts as zero)."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    comm.allreduce(flat, op="sum")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def evaluation(parts: dict[str, tuple[float, int, int]]) -> dict[str, tuple[float, int]]:
    """{"val": ..., "test": ...} (loss sum, correct, vertices) -> the worker's evaluation shape."""
    out: dict[str, tuple[float, int]] = {}
    for view, name in (("model", "val"), ("test", "test")):
        loss, correct, count = parts[name]
        out[view] = (loss, count)
        out[f"{view}/accuracy"] = (correct, count)
    return out


def masks(graph: Any) -> dict[str, torch.Tensor]:
    return {"val": graph.val_mask, "test": graph.test_mask}
