"""The metrics sink writes metrics.jsonl every step and an offline W&B run into the run dir."""

import json
from dataclasses import dataclass, field

import pytest

from raylane.orchestrator.metrics import MetricsSink

pytestmark = pytest.mark.timeout(120)


@dataclass
class _Logging:
    wandb_mode: str = "disabled"
    project: str = "raylane-test"
    entity: str | None = None
    group: str | None = None
    tags: list = field(default_factory=lambda: ["test"])
    progress: bool = False


def test_metrics_jsonl_gets_one_line_per_log(tmp_path):
    sink = MetricsSink(tmp_path, _Logging(), 3, 0, "abc", "t", {})
    for step in (1, 2, 3):
        sink.log(step, {"train/loss": 1.0 / step}, advance=1)
    sink.event(3, "checkpoint", path="x")
    sink.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 3]
    assert lines[1]["train/loss"] == 0.5 and lines[3]["event"] == "checkpoint"


def test_wandb_offline_run_lands_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    sink = MetricsSink(tmp_path, _Logging(wandb_mode="offline"), 2, 0, "runid123", "t", {"seed": 1})
    sink.log(1, {"train/loss": 2.0})
    sink.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*-runid123"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no offline run file written"
