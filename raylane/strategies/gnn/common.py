"""What the full-graph GNN strategies (gnnpipe, graph_parallel) share.

- `check_graph_run(run_cfg)`: a GNN model (model=gcn | sage | gcnii) on a graph dataset
  (data=csbm | karate | graph), checked at config validation.
- `FullGraphDriver`: one round = one epoch on every worker; the loss of the whole graph is the sum
  of the ranks' `loss_part` (each rank holds the loss of its vertices, scaled by 1 / train vertices),
  copied to every rank's result, so that the coordinator's average is the graph's loss. Every
  `best_val_every` epochs it also evaluates (the workers' `evaluate`, whose bytes are not counted
  as training) and keeps the literature's accuracy protocol, `BestValidation`: logged as
  `eval/best_val_accuracy`, `eval/test_accuracy_at_best_val`, `eval/best_val_step` (the last
  epoch's accuracies are the coordinator's `eval/accuracy`, `eval/accuracy_test`). With
  `patience` > 0, training stops (rounds do nothing) after that many evaluations without a better
  validation accuracy.
- `step_optimizer`: clip by the norm of the whole model's gradient (summed over the ranks that
  hold different parameters), set the lr, step.
- `evaluation(...)`: the worker's evaluation shape from per-mask (loss sum, correct, vertices):
  view `model` = validation vertices (eval/loss, eval/accuracy), view `test` = test vertices.
"""

from __future__ import annotations

from typing import Any

import torch

from raylane.strategies.base import DriverStrategy, WorkerCalls, WorkerContext
from raylane.strategies.gnn.partition import PARTITIONERS
from raylane.validation import check, one_of

GNN_MODELS = ("gcn", "sage", "gcnii")
GRAPH_DATA = ("csbm", "karate", "graph")


def check_graph_run(run_cfg: Any, strategy: str) -> None:
    check(run_cfg.model.name in GNN_MODELS, "model.name", run_cfg.model.name,
          f"strategy={strategy} trains a GNN: choose one of {list(GNN_MODELS)}")
    check(run_cfg.data.name in GRAPH_DATA, "data.name", run_cfg.data.name,
          f"strategy={strategy} trains on a whole graph: choose one of {list(GRAPH_DATA)}")


class BestValidation:
    """Test accuracy at the epoch of the best validation accuracy (ties: the earlier epoch)."""

    def __init__(self, patience: int = 0):
        self.patience, self.best_val, self.test_at_best, self.best_step, self.since = patience, -1.0, 0.0, 0, 0

    def observe(self, step: int, val_accuracy: float, test_accuracy: float) -> dict[str, float]:
        if val_accuracy > self.best_val:
            self.best_val, self.test_at_best, self.best_step, self.since = val_accuracy, test_accuracy, step, 0
        else:
            self.since += 1
        return {"eval/best_val_accuracy": self.best_val, "eval/test_accuracy_at_best_val": self.test_at_best,
                "eval/best_val_step": self.best_step}

    @property
    def stopped(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best_val", "test_at_best", "best_step", "since")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def accuracies(parts: list[dict]) -> tuple[float, float]:
    """(validation, test) accuracy of the whole graph from every rank's `evaluate`."""
    def acc(key: str) -> float:
        return sum(p[key][0] for p in parts) / max(1, sum(p[key][1] for p in parts))
    return acc("model/accuracy"), acc("test/accuracy")


class FullGraphDriver(DriverStrategy):
    """Every worker trains one epoch; the graph's loss (sum of `loss_part`) goes to every result;
    every `best_val_every` epochs an evaluation updates the best-validation record (rank 0's result)."""

    def __init__(self, cfg: Any, world_size: int):
        super().__init__(cfg, world_size)
        self.best = BestValidation(getattr(cfg, "patience", 0))

    def run_round(self, workers: WorkerCalls, step: int, sample_offset: int, lr: float) -> list[dict]:
        if self.best.stopped:
            return []  # early stopping: the remaining steps do nothing
        results = workers.get(workers.call("train_step", sample_offset, lr))
        total = sum(r.pop("loss_part") for r in results)
        for r in results:
            r["loss"] = total
        self.summarise(results)
        every = getattr(self.cfg, "best_val_every", 0)
        if every and step % every == 0:
            parts = workers.get(workers.call("evaluate", len(results)))
            results[0].update(self.best.observe(step, *accuracies(parts)))
        return results

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.load_state_dict(state.get("best", {}))

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


def check_graph_options(cfg: Any, prefix: str) -> None:
    """The options graph_parallel and gnnpipe share: partitioner, best-validation evaluation, patience."""
    one_of(f"{prefix}.partitioner", cfg.partitioner, PARTITIONERS)
    check(cfg.best_val_every >= 0, f"{prefix}.best_val_every", cfg.best_val_every, "must be >= 0")
    check(cfg.patience >= 0, f"{prefix}.patience", cfg.patience, "must be >= 0")
