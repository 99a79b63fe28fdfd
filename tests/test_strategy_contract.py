"""The "add a strategy" checklist's loud failure: a new strategy whose ranks step locally but keeps
the inherited `replicas_identical = True` is stopped at its first checkpoint with a line that names
the flag, instead of checkpointing one rank's copy and recovering every rank to it. No Ray: the
TrainWorkers run as plain objects in threads; the check is the one the coordinator makes."""

from __future__ import annotations

from raylane import strategies
from raylane.orchestrator.contract import identical_state_problem
from raylane.strategies.base import WorkerStrategy, register
from raylane.workers.worker import TrainWorker
from tests.conftest import small_cfg
from tests.multiproc import run_workers_in_threads


class LocalStepsWorker(WorkerStrategy):
    """Local SGD with no sync at all: each rank steps on its own shard (replicas_identical inherited)."""

    def train_step(self, batch, lr: float) -> dict:
        for group in self.ctx.optimizer.param_groups:
            group["lr"] = lr
        self.ctx.optimizer.zero_grad(set_to_none=True)
        loss = self.ctx.loss(batch)
        loss.backward()
        self.ctx.optimizer.step()
        return {"loss": loss.item()}


register("_test_local_steps", strategies.get("ddp").config_cls, LocalStepsWorker)


def _fingerprints_after_steps(cfg, world: int, steps: int) -> list:
    def body(worker: TrainWorker) -> list[float]:
        for step in range(steps):
            worker.train_step(step * world * cfg.data.batch_size, 1e-2)
        return worker.fingerprint()

    return run_workers_in_threads(cfg, world, body)


def test_local_step_strategy_with_the_inherited_replicas_identical_flag_fails_loudly(tmp_path):
    for name, wrong in (("_test_local_steps", True), ("ddp", False)):
        cfg = small_cfg(tmp_path, "cluster.num_workers=2", f"strategy.name={name}")
        spec = strategies.get(name)
        prints = _fingerprints_after_steps(cfg, 2, 1)
        problem = identical_state_problem(spec.worker_cls.layout(cfg.strategy, 2), prints, name)
        if wrong:
            assert problem is not None and "ranks 0 and 1 share state key 'replica'" in problem
            assert "replicas_identical = False" in problem and "Adding a strategy" in problem
        else:
            assert problem is None, problem
