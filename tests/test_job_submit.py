"""`ray job submit` against a fresh `ray start --head` (token auth, as the README tells users), with
Hydra overrides."""

import subprocess
import time
from pathlib import Path

import pytest

from tests.ray_head import BIN, local_head

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parent.parent


def _ray(env, *args, timeout=120):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _submit_and_wait(url, env, run_root, job_id, timeout_s=240):
    overrides = [f"run.root={run_root}", "run.name=submitted", "train.steps=6", "checkpoint.every=3",
                 "cluster.num_workers=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                 "data.batch_size=4", "logging.progress=false"]
    proc = _ray(env, "job", "submit", "--address", url, "--submission-id", job_id, "--no-wait",
                "--working-dir", str(REPO), "--", "python", "-m", "raylane.train", *overrides)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = _ray(env, "job", "status", "--address", url, job_id).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = _ray(env, "job", "logs", "--address", url, job_id).stdout
    assert "succeeded" in status, f"{status}\n{logs[-4000:]}"
    return logs


def test_ray_job_submit_writes_run_dir_outside_working_dir_copy(tmp_path):
    with local_head(tmp_path / "head") as (url, env):
        logs = _submit_and_wait(url, env, tmp_path / "runs", f"raylane-test-{time.time_ns()}")
    run = tmp_path / "runs" / "submitted"
    assert (run / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    resolved = (run / "config.yaml").read_text()
    assert "steps: 6" in resolved and "num_workers: 2" in resolved
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert "raylane summary" in logs
