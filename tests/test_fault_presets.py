"""Every fault preset in configs/faults/ runs end to end at a tiny size and does what its comment
says: the run finishes, each step appears once, the fault is announced and (when it breaks a
round) recovered, a hang is caught within the collective timeout plus the grace period;
`raylane.chaos` writes its reports (driver_crash: tests/test_faults_process.py)."""

import json

import pytest
import yaml

from raylane import chaos, config, train
from raylane.orchestrator.coordinator import run
from raylane.orchestrator.metrics import read_records
from raylane.orchestrator.worker_group import GRACE_S
from tests.conftest import SMALL, small_cfg
from tests.test_run_names_and_presets import FAULT_PRESETS, preset_overrides

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]

TIMEOUT_S = 3
FAST = ["cluster.num_workers=4", f"cluster.collective_timeout_s={TIMEOUT_S}", "cluster.replace_timeout_s=20"]
DETECTABLE = ("crash", "kill", "node_loss", "hang")
PRESET_SMALL = [o for o in SMALL if not o.startswith("checkpoint.")]  # a preset may set its checkpoints


def _steps_for(overrides: list[str], tmp_path) -> int:
    """Just past the preset's last triggered event (3 steps for whole-run faults)."""
    events = small_cfg(tmp_path, *overrides, *FAST).faults.events
    return max([e.step for e in events if e.step is not None] + [1]) + 2


# driver_crash stops the process: tests/test_faults_process.py runs it. Presets that need another strategy
# ("Needs strategy=robust.") are run end to end by that strategy's tests.
IN_PROCESS = [p for p in FAULT_PRESETS if p != "driver_crash" and len(preset_overrides(p)) == 1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preset", IN_PROCESS)
def test_fault_preset_runs_end_to_end(ray_cluster, tmp_path, preset):
    overrides = preset_overrides(preset)
    steps = _steps_for(overrides, tmp_path)
    cfg = config.load([*PRESET_SMALL, f"run.root={tmp_path}", *overrides, *FAST, f"train.steps={steps}"])
    summary = run(cfg)
    assert summary.steps == steps and summary.wall_s > 0
    rows = read_records(cfg.run.path() / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, steps + 1))
    events = [r for r in rows if "event" in r]
    injected = {e["kind"] for e in events if e["event"] == "fault_injected"}
    planned = {e.kind for e in cfg.faults.events if e.step is not None}
    assert planned <= injected
    saved = yaml.safe_load((cfg.run.path() / "summary.yaml").read_text())
    assert saved["wall_s"] > 0 and {f["kind"] for f in saved["faults"].get("injected", [])} == injected
    broken = [e for e in cfg.faults.events if e.kind in DETECTABLE]
    assert len([e for e in events if e["event"] == "recovered"]) == len(broken)
    for e in events:
        if e["event"] == "fault_detected" and e["hung"]:
            assert e["detection_s"] <= TIMEOUT_S + GRACE_S + 2.0, e


def test_chaos_runs_both_jobs_and_writes_json_and_html_reports(ray_cluster, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(train, "connect_ray", lambda cluster: True)  # the session's cluster
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert chaos.main([*SMALL, f"run.root={tmp_path}", "faults=crash", "train.steps=22", *FAST]) == 0
    faulty = tmp_path / "ddp-char_transformer-crash-faulty"
    assert (tmp_path / "ddp-char_transformer-crash-fault-free" / "summary.yaml").is_file()
    data = json.loads((faulty / "chaos.json").read_text())
    [row] = data["faults"]
    assert (row["kind"], row["rank"], row["injected_step"], row["steps_lost"]) == ("crash", 1, 20, 0)
    assert abs(data["eval_loss_delta"]) < 1e-6  # recovered from a live peer: the same parameters
    page = (faulty / "chaos.html").read_text()
    assert "<h2>Faults</h2>" in page and "fault injected" in page and "Loss vs wall time" in page
    out = capsys.readouterr().out
    assert "crash" in out and "chaos.html" in out
