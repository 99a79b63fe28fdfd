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


def test_straggler_panels_read_metrics_a_straggler_plan_writes():
    from raylane.dashboard import LAYOUT
    from raylane.orchestrator.straggler_stats import step_metrics

    written = step_metrics({1: 0.3}, {"gc/wait_s": 0.2, "gc/stragglers": 1})
    wanted = {y for _, plots in LAYOUT for _, _, ys in plots for y in ys if y.startswith("stragglers/")}
    assert wanted and wanted <= set(written)
    assert (written["stragglers/wait_s"], written["stragglers/tolerated"], written["stragglers/delayed"]) == (0.2, 1, 1)
