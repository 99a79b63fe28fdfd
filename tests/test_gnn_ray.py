"""gnnpipe end to end on the local Ray cluster: each worker builds only its stage, metrics and
evaluation come through the pipeline, and a stage lost mid-run is replaced and restored from the
newest checkpoint (one state key per stage), the failed epoch redone once."""

import json

import pytest
import torch

from raylane import config
from raylane.comm import wire
from tests.conftest import train_and_collect

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]


def test_gnnpipe_trains_evaluates_and_recovers_a_lost_stage_from_its_checkpoint(ray_cluster, tmp_path):
    cfg = config.load(["strategy=gnnpipe", "model=gcnii", "data=csbm", "cluster.num_workers=2",
                       "cluster.cpus_per_worker=0.5", "model.n_layer=4", "model.d_model=8",
                       "data.graph.num_vertices=300", "data.num_classes=3", "strategy.chunks=3", "train.steps=8",
                       "train.eval_every=4", "checkpoint.every=2", "optim.warmup_steps=0", "optim.lr=0.03",
                       "logging=quiet", f"run.root={tmp_path}", "run.name=pipe",
                       "+faults.events=[{kind: crash, rank: 1, step: 5, mode: exit}]"])
    _, parts = train_and_collect(cfg, "state_dict")
    # each rank holds its stage only: stage 0 the input projection, stage 1 the classifier
    keys = [set(p["replica"]["model"]) for p in parts]
    assert any(k.startswith("input.") for k in keys[0]) and not any(k.startswith("head.") for k in keys[0])
    assert any(k.startswith("head.") for k in keys[1]) and not any(k.startswith("input.") for k in keys[1])
    assert [p["replica"]["strategy"]["epoch"] for p in parts] == [8, 8]
    lines = [json.loads(x) for x in (tmp_path / "pipe" / "metrics.jsonl").read_text().splitlines()]
    steps = {x["step"]: x for x in lines if "train/loss" in x}
    events = [x for x in lines if "event" in x]
    assert sorted(steps) == list(range(1, 9))
    recovered = [e for e in events if e["event"] == "recovered"]
    assert len(recovered) == 1 and recovered[0]["source"] == "checkpoint"
    rewound = [e for e in events if e["event"] == "rewound"]
    assert [e["to_step"] for e in rewound] == [4]  # the newest checkpoint before the crash at step 5
    per_boundary = 2 * 300 * 2 * 8 * 4  # [h, x0] of every vertex, forward and backward
    assert [s["gnnpipe/boundary0_bytes"] for s in steps.values()] == [per_boundary] * 8
    norm = sum(wire.gloo_allreduce(4, 4, 2, r).bytes_sent for r in range(2))  # grad clip: the squared norms summed
    assert [s["comm/bytes_sent"] for s in steps.values()] == [per_boundary + norm] * 8
    assert steps[8]["train/loss"] < steps[1]["train/loss"]
    evals = [x for x in lines if "eval/accuracy" in x]
    assert [e["step"] for e in evals] == [4, 8] and 0 <= evals[-1]["eval/accuracy"] <= 1
    meta = json.loads(sorted((tmp_path / "pipe" / "checkpoints").glob("step_*/meta.json"))[-1].read_text())
    assert meta["state_keys"] == ["stage_0", "stage_1"]
    assert torch.is_tensor(parts[1]["replica"]["model"]["head.weight"])
