"""The W&B dashboard is built as a workspace object with the panels users read; no server needed."""

import pytest

from raylane.dashboard import build_workspace, main

pytestmark = pytest.mark.timeout(60)


def test_workspace_has_loss_bytes_step_time_straggler_and_fault_panels():
    ws = build_workspace("someone", "raylane")
    panels = {p.title: p for s in ws.sections for p in s.panels}
    assert panels["loss vs step"].y == ["train/loss", "eval/loss"]
    assert panels["loss vs bytes on the wire"].x == "comm/bytes_total"
    assert panels["bytes per step (all workers)"].y == ["comm/bytes_sent"]
    assert "train/step_time_s" in panels["step time"].y
    assert panels["straggler wait"].y == ["stragglers/wait_s"]
    assert panels["fault events"].y == ["faults/events"]
    assert (ws.entity, ws.project) == ("someone", "raylane")


def test_dashboard_command_without_save_prints_sections(capsys):
    assert main(["--entity", "someone"]) == 0
    out = capsys.readouterr().out
    assert "Loss:" in out and "Faults:" in out
