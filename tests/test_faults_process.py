"""Faults that take a whole process: a node (own multi-node cluster) and the driver (the CLI)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylane import train
from raylane.orchestrator import checkpoint
from tests.conftest import SMALL

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parent.parent


def test_node_loss_of_2_of_4_workers_recovers_to_identical_parameters(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tests.scenarios.node_loss", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == [10, 10] and result["samples"][0] == result["samples"][1]
    assert result["identical"], result["max_abs_diff"]
    detected = next(e for e in result["events"] if e["event"] == "fault_detected")
    assert len(detected["dead"]) == 2
    assert next(e for e in result["events"] if e["event"] == "recovered")["steps_lost"] == 0


def _cli(root, *extra):
    args = [*SMALL, f"run.root={root}", "run.name=crashy", "train.steps=12", "checkpoint.every=4",
            "cluster.num_workers=2", *extra]
    return subprocess.run([sys.executable, "-m", "raylane.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=240)


def _final_params(run_dir):
    path, meta = checkpoint.latest(run_dir / "checkpoints")
    model = checkpoint.load_part(path, "replica")["model"]
    return meta["step"], torch.cat([v.reshape(-1) for v in model.values()])


def test_driver_crash_then_same_command_resumes_and_matches_fault_free(tmp_path):
    crash = "+faults.events=[{kind: driver_crash, step: 7}]"
    first = _cli(tmp_path / "a", crash)
    assert first.returncode == 3, first.stderr[-2000:]
    assert not (tmp_path / "a" / "crashy" / "summary.yaml").exists()
    second = _cli(tmp_path / "a", crash)  # the very same command
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stderr
    straight = _cli(tmp_path / "b")
    assert straight.returncode == 0, straight.stderr[-2000:]
    step_a, params_a = _final_params(tmp_path / "a" / "crashy")
    step_b, params_b = _final_params(tmp_path / "b" / "crashy")
    assert step_a == step_b == 12
    assert torch.equal(params_a, params_b)
    lines = [json.loads(x) for x in (tmp_path / "a" / "crashy" / "metrics.jsonl").read_text().splitlines()]
    resumed = next(x for x in lines if x.get("event") == "resumed")
    assert resumed["from_step"] == 4  # steps 5-6 were lost with the driver and redone


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
    assert _cli(tmp_path, "train.steps=8").returncode == 0
    run_dir = tmp_path / "crashy"
    (run_dir / "summary.yaml").unlink()  # as if it had stopped after its last checkpoint
    newest = run_dir / "checkpoints" / "step_00000008" / "replica.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # half-written
    again = _cli(tmp_path, "train.steps=8")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipping checkpoint" in again.stderr and "checksum" in again.stderr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in lines if x.get("event") == "resumed"][-1]["from_step"] == 4


@pytest.mark.parametrize("event,key", [
    ("{kind: boom, rank: 1, step: 2}", "faults.events[0].kind='boom'"),
    ("{kind: crash, rank: 7, step: 2}", "faults.events[0].rank=7"),
    ("{kind: hang, step: 2}", "faults.events[0].rank=None"),
])
def test_bad_fault_plan_is_a_one_line_error_naming_the_entry(capsys, event, key):
    assert train.main([f"+faults.events=[{event}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]
