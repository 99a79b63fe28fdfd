"""The robust strategy end to end: Gloo ranks without Ray (bit-identical replicas, attacks forged
by the Byzantine rank through the fault plan), and one run on the local Ray cluster per layout."""

from __future__ import annotations

import json

import pytest
import torch

from raylane import config
from raylane.orchestrator.faults import FaultPlan
from raylane.strategies.base import WorkerContext
from raylane.strategies.robust.strategy import RobustWorker
from raylane.workers.optim import lr_at
from raylane.workers.worker import TrainWorker

pytestmark = pytest.mark.timeout(240)

DIGITS = ["strategy=robust", "model=mlp", "model.hidden=[32]", "data=digits", "data.batch_size=16",
          "logging=quiet", "train.eval_every=0", "checkpoint.every=0", "optim.warmup_steps=0"]
STEPS = 4


def _overrides(aggregator: str, epsilon: float) -> list[str]:
    return [*DIGITS, "cluster.num_workers=4", "strategy.f=1", f"strategy.aggregator={aggregator}",
            f"train.steps={STEPS}", "+faults.events=[{kind: byzantine, rank: 0, step: 1, until: 100, mode: ipm, "
            f"epsilon: {epsilon}}}]"]


def _train_on_rank(comm, runs: list[list[str]]) -> list[dict]:
    """Each run: a TrainWorker on this rank joined to `comm`, driven as the coordinator would."""
    out = []
    for overrides in runs:
        cfg = config.load(overrides)
        w = TrainWorker(cfg, comm.rank)
        w.comm = comm
        ctx = WorkerContext(w.model, w.optimizer, comm, w._loss, cfg.optim.grad_clip, comm.rank, comm.world_size,
                            cfg.seed, data=w.data, batch=w.batch)
        w.strategy = RobustWorker(cfg.strategy, ctx)
        plan, metrics = FaultPlan(cfg.faults, cfg.seed), []
        for step in range(1, STEPS + 1):
            directive = plan.directives(step, comm.world_size).get(comm.rank)
            offset = (step - 1) * comm.world_size * cfg.data.batch_size
            metrics.append(w.run(directive, step, "train_step", offset, lr_at(step, STEPS, cfg.optim)))
        # bytes, not tensors: a tensor would cross the queue as shared memory the exiting child frees
        out.append({"params": w.flat_parameters().numpy().tobytes(), "metrics": metrics})
    return out


def test_every_rank_applies_the_same_bits_and_flag_resists_ipm_that_breaks_the_mean():
    from tests.multiproc import run_ranks

    runs = [_overrides("flag", 4.0), _overrides("mean", 4.0),
            [*_overrides("centered_clipping", 4.0), "strategy.compression.name=int", "strategy.compression.bits=8"]]
    ranks = run_ranks(_train_on_rank, 4, runs, timeout_s=120)
    for run in range(len(runs)):
        first = ranks[0][run]["params"]
        assert all(r[run]["params"] == first for r in ranks[1:]), f"run {run}: replicas differ"
    flag, mean = ranks[0][0]["metrics"], ranks[0][1]["metrics"]
    # one Byzantine row of -4 x the honest mean: the mean points backwards, Flag along the honest mean
    assert all(m["robust/byzantine_rows"] == 1 for m in flag)
    assert all(m["robust/cos_to_honest_mean"] < 0 for m in mean)
    assert all(m["robust/cos_to_honest_mean"] > 0.9 for m in flag)
    # Flag's IRLS weights are per rank and sum to 1 (a row along -mu lies in the flag's subspace: its
    # weight is not small; its signed contribution in Y Yᵀ sum x_i is what the honest rows outvote)
    assert all(sum(m[f"robust/flag_weight/rank{i}"] for i in range(4)) == pytest.approx(1) for m in flag)


@pytest.mark.ray
@pytest.mark.parametrize("layout,mode", [("workers", "alie"), ("driver", "label_flip")])
def test_robust_on_ray_trains_digits_with_a_byzantine_worker(ray_cluster, tmp_path, layout, mode):
    from tests.conftest import train_and_collect

    cfg = config.load([*DIGITS, f"run.root={tmp_path}", "cluster.num_workers=4", "strategy.f=1",
                       "strategy.aggregator=flag", f"strategy.aggregate_on={layout}", "train.steps=30",
                       "optim.lr=0.01", "data.eval_batches=23",
                       f"+faults.events=[{{kind: byzantine, rank: 3, step: 1, until: 100, mode: {mode}}}]"])
    coord, params = train_and_collect(cfg)
    assert all(torch.equal(p, params[0]) for p in params[1:])
    rows = [json.loads(line) for line in (coord.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "robust/aggregate_s" in r]
    assert len(steps) == 30 and all(r["robust/byzantine_rows"] == 1 for r in steps)
    assert all(r["comm/bytes_sent"] > 0 for r in steps)
    accuracy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert accuracy and accuracy[-1] > 0.5   # chance: 0.1
