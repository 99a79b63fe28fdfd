"""Checkpoint at step k, stop, resume=true: continues at k+1 and ends where an uninterrupted run ends."""

import json

import pytest
import torch

from raylane.orchestrator.coordinator import Coordinator
from tests.conftest import small_cfg, train_and_collect

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]


def test_resume_from_checkpoint_matches_uninterrupted_run(ray_cluster, tmp_path):
    common = ["train.steps=10", "checkpoint.every=5", "cluster.num_workers=2", "data.name=chars"]
    interrupted = small_cfg(tmp_path, *common, "run.name=interrupted")
    coord = Coordinator(interrupted)
    try:
        coord.train(until_step=7)  # checkpoint at 5, then two steps that are lost
    finally:
        coord.close()

    resumed_cfg = small_cfg(tmp_path, *common, "run.name=interrupted", "resume=true")
    coord = Coordinator(resumed_cfg)
    try:
        assert coord.step == 5
        coord.train()
        resumed = coord.group.get(coord.group.call("flat_parameters"))[0]
    finally:
        coord.close()

    _, straight = train_and_collect(small_cfg(tmp_path, *common, "run.name=straight"))

    assert torch.equal(resumed, straight[0])
    lines = [json.loads(x) for x in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    resumed_at = next(i for i, x in enumerate(lines) if x.get("event") == "resumed")
    assert lines[resumed_at]["from_step"] == 5
    steps_after = [x["step"] for x in lines[resumed_at:] if "train/loss" in x]
    assert steps_after == [6, 7, 8, 9, 10]
