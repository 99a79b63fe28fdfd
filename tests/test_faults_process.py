"""Faults that take a whole process: a node (own multi-node cluster) and the driver (the CLI)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raylane import config, train
from raylane.orchestrator import checkpoint
from raylane.orchestrator.coordinator import run
from raylane.orchestrator.metrics import read_records
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


def _final_params(run_dir):
    path, meta = checkpoint.latest(run_dir / "checkpoints")
    model = checkpoint.load_part(path, "replica")["model"]
    return meta["step"], torch.cat([v.reshape(-1) for v in model.values()])


CRASHY = [*SMALL, "checkpoint.every=25", "train.steps=34", "cluster.num_workers=2"]


def test_driver_crash_preset_then_the_same_command_resumes_and_matches_fault_free(ray_cluster, tmp_path):
    """The one fault that takes the driver: a real process dies (exit 3) and the very same command resumes."""
    args = [sys.executable, "-m", "raylane.train", *CRASHY, f"run.root={tmp_path / 'a'}", "faults=driver_crash"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert first.returncode == 3, first.stderr[-2000:]
    assert "fault injected: driver_crash at step 30" in first.stderr
    run_dir = tmp_path / "a" / "ddp-char_transformer-driver_crash"
    assert not (run_dir / "summary.yaml").exists()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming it" in second.stderr and not list((tmp_path / "a").glob("*.2*"))  # nothing moved aside
    rows = read_records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 35))
    times = [r["time_s"] for r in rows]
    assert times == sorted(times)
    resumed = next(r for r in rows if r.get("event") == "resumed")
    assert (resumed["from_step"], resumed["steps_redone"]) == (25, 4)  # steps 26-29 died with the driver
    saved = yaml.safe_load((run_dir / "summary.yaml").read_text())
    assert saved["steps"] == 34 and saved["faults"]["resumes"] == 1 and saved["wall_s"] > 0
    straight = config.load([*CRASHY, f"run.root={tmp_path / 'b'}", "run.name=straight"])  # on the session's cluster
    run(straight)
    step_a, params_a = _final_params(run_dir)
    step_b, params_b = _final_params(straight.run.path())
    assert step_a == step_b == 34
    assert torch.equal(params_a, params_b)


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(ray_cluster, tmp_path, caplog):
    args = [*SMALL, f"run.root={tmp_path}", "run.name=crashy", "train.steps=8", "checkpoint.every=4",
            "cluster.num_workers=2"]
    run(config.load(args))
    run_dir = tmp_path / "crashy"
    (run_dir / "summary.yaml").unlink()  # as if it had stopped after its last checkpoint
    newest = run_dir / "checkpoints" / "step_00000008" / "replica.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # half-written
    with caplog.at_level(logging.WARNING):
        run(config.load(args))
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert skipped and "checksum" in skipped[0]
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
