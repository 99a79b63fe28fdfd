"""The HTML report from metrics.jsonl alone: bad input is one line (exit 2), each step is shown once,
runs are told apart by strategy and differing keys, faults are marked; chaos's fault table (no Ray)."""

import json
import re

import pytest
import yaml

from raylane import chaos, report
from raylane.orchestrator.summary import final_train_loss

pytestmark = pytest.mark.timeout(120)


def _run(path, rows, config=None, summary=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (path / "summary.yaml").write_text(yaml.safe_dump(summary))
    return path


def _rows(steps, t0=0.0, loss=2.0):
    return [{"step": s, "time_s": t0 + s * 0.1, "train/loss": loss - s * 0.01, "train/round_s": 0.1,
             "comm/bytes_sent": 1000, "comm/bytes_total": 1000 * s} for s in steps]


def _error(capsys, *argv):
    code = report.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("content, says", [
    ("not json at all\n{}\n", "not a JSON line"),
    ("[1, 2, 3]\n", "JSON object with an integer 'step'"),
    ('{"time_s": 1.0, "train/loss": 2.0}\n', "JSON object with an integer 'step'"),
    ("", "nothing to plot"),
    ('{"step": 0, "event": "resumed", "from_step": 0}\n', "nothing to plot"),
])
def test_bad_metrics_file_is_a_one_line_error_exit_2(tmp_path, capsys, content, says):
    (tmp_path / "metrics.jsonl").write_text(content)
    code, err = _error(capsys, tmp_path, "-o", tmp_path / "r.html")
    assert code == 2 and len(err) == 1 and says in err[0] and str(tmp_path) in err[0]
    assert not (tmp_path / "r.html").exists()


def test_unwritable_output_is_a_one_line_error_exit_2(tmp_path, capsys):
    run = _run(tmp_path / "r", _rows(range(1, 4)))
    code, err = _error(capsys, run, "-o", tmp_path / "no" / "such" / "dir" / "r.html")
    assert code == 2 and len(err) == 1 and "cannot write there" in err[0]


def test_old_resume_rows_are_superseded_and_time_made_monotonic(tmp_path):
    rows = _rows(range(1, 9)) + [{"step": 5, "time_s": 0.0, "event": "resumed", "from_step": 5}] + \
        _rows(range(6, 11), t0=-0.5)  # the clock restarted at 0 in the old format
    records = report.load_run(_run(tmp_path / "r", rows))
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == list(range(1, 11))
    times = [r["time_s"] for r in records]
    assert times == sorted(times)


def test_summary_row_uses_the_summary_definitions_and_differing_keys(tmp_path):
    base = {"strategy": {"name": "ddp"}, "optim": {"lr": 1e-3}, "run": {"name": "a"}, "seed": 0}
    a = _run(tmp_path / "a", _rows(range(1, 41)), base, {"tokens_per_s": 1234.5})
    b = _run(tmp_path / "b", _rows(range(1, 41)), {**base, "optim": {"lr": 3e-3}, "run": {"name": "b"}})
    assert report.differing_keys([yaml.safe_load((d / "config.yaml").read_text()) for d in (a, b)]) == ["optim.lr"]
    row = report.summarize("a", report.load_run(a), a, ["optim.lr"])
    losses = [r["train/loss"] for r in _rows(range(1, 41))]
    assert row["final train loss"] == final_train_loss(losses)
    assert (row["strategy"], row["optim.lr"], row["tokens/s"], row["steps"]) == ("ddp", 1e-3, 1234.5, 40)
    page = report.render([a, b])
    assert "<th>optim.lr</th>" in page and "<th>strategy</th>" in page and "1,234.5" in page
    c = _run(tmp_path / "c", _rows(range(1, 41)), {**base, "run": {"name": "c"}},
             {"tokens_per_s": 50.0, "throughput_unit": "samples"})  # a classification run: samples/s
    assert report.summarize("c", report.load_run(c), c, [])["samples/s"] == 50.0
    assert "<th>samples/s</th>" in report.render([c])
    assert "<th>tokens or samples/s</th>" in report.render([a, c])


def test_plots_include_loss_vs_wall_time_and_fault_markers_with_a_legend_outside(tmp_path):
    rows = _rows(range(1, 11))
    rows.insert(4, {"step": 5, "time_s": 0.5, "event": "fault_injected", "kind": "crash", "rank": 1})
    rows.insert(6, {"step": 5, "time_s": 0.7, "event": "recovered", "recovery_s": 0.2, "steps_lost": 0})
    page = report.render([_run(tmp_path / "faulty", rows)])
    figures = dict(re.findall(r'<figure class="plot" data-metric="([^"]+)">(.*?)</figure>', page, re.S))
    assert list(figures) == [p[0] for p in report.PLOTS] and "Loss vs wall time" in figures
    for title in ("Loss vs step", "Loss vs wall time"):
        assert "fault injected" in figures[title] and "recovered" in figures[title]
    assert "fault injected" not in figures["Loss vs bytes on the wire"]


def test_cell_formats_are_readable():
    assert report._cell(5707520) == "5,707,520"
    assert report._cell(2.901234) == "2.9012"
    assert report._cell(23140.2) == "23,140.2"
    assert report._cell(1.2e-5) == "1.2e-05"
    assert report._cell(None) == "-" and report._cell(True) == "true"


def test_chaos_fault_table_names_kind_worker_and_step():
    events = [{"step": 10, "event": "fault_injected", "kind": "byzantine", "rank": 3},
              {"step": 20, "event": "fault_injected", "kind": "crash", "rank": 1},
              {"step": 20, "event": "fault_detected", "dead": [1], "hung": [], "detection_s": 0.21},
              {"step": 20, "event": "recovered", "recovery_s": 2.1, "steps_lost": 0, "source": "peer (rank 0)",
               "workers": 4}]
    rows = chaos.faults_table(events)
    assert [(r["kind"], r["rank"], r["injected_step"]) for r in rows] == [("crash", 1, 20), ("byzantine", 3, 10)]
    assert rows[1]["source"] == "not detected" and rows[1]["detection_s"] is None
    text = chaos.console_table(rows)
    assert "kind" in text.splitlines()[0] and "crash" in text and "byzantine" in text


def test_compact_table_accuracy_plot_faults_in_words_and_distinct_colours(tmp_path):
    rows = [{**r, "eval/accuracy": 0.5 + r["step"] / 100} for r in _rows(range(1, 11))]
    rows.insert(4, {"step": 5, "time_s": 0.5, "event": "fault_injected", "kind": "crash", "rank": 1})
    run = _run(tmp_path / "acc", rows, {"strategy": {"name": "diloco", "fragments": 2}, "run": {"name": "acc"}})
    row = report.summarize("acc", report.load_run(run), run)
    assert (row["strategy"], row["faults"], row["final accuracy"]) == ("streaming_diloco", "crash w1@5", 0.6)
    page = report.render([run])
    first = page.split("<h3>")[0]
    assert "<th>final accuracy</th>" in first and "<th>tokens/s</th>" not in first and "Accuracy vs step" in page
    assert len({str(c) for c in report.run_colors(25)}) == 25 and len(set(report.run_colors(12))) == 12
