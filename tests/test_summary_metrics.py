"""One definition of each summary number; metrics.jsonl shows each step once with a monotonic
clock after a resume; log lines go through the bar's writer; Ctrl-C says how to continue (no Ray)."""

import io
import json
import logging
from dataclasses import dataclass, field

import pytest

from raylane import train
from raylane.orchestrator.coordinator import Interrupted
from raylane.orchestrator.metrics import BarLogHandler, MetricsSink, read_records, rewrite_up_to
from raylane.orchestrator.summary import FINAL_TRAIN_WINDOW, Summary, fault_lines, fault_section, final_train_loss

pytestmark = pytest.mark.timeout(120)


@dataclass
class _Logging:
    wandb_mode: str = "disabled"
    project: str = "raylane-test"
    entity: str | None = None
    group: str | None = None
    tags: list = field(default_factory=list)
    progress: bool = False


class _Recorder:
    def __init__(self):
        self.steps = []

    def log(self, metrics, step):
        self.steps.append(step)

    def finish(self):
        pass


def test_final_train_loss_is_the_mean_of_the_last_window_everywhere():
    losses = [float(i) for i in range(50)]
    want = sum(losses[-FINAL_TRAIN_WINDOW:]) / FINAL_TRAIN_WINDOW
    s = Summary()
    for step, loss in enumerate(losses, 1):
        s.record_step(step, loss, 0, 10)
    assert final_train_loss(losses) == s.train_loss == s.as_dict()["final_train_loss"] == want
    assert f"mean of the last {FINAL_TRAIN_WINDOW} steps" in s.table()
    assert final_train_loss([]) is None


def test_tokens_per_s_is_kept_tokens_over_the_run_clock_and_survives_a_checkpoint():
    s = Summary()
    for step in range(1, 11):
        s.record_step(step, 1.0, 0, 1000)
    s.wall_s = 4.0  # set from the run's clock before each checkpoint and at the end
    restored = Summary()
    restored.load_state_dict(s.state_dict())
    for step in range(11, 21):
        restored.record_step(step, 1.0, 0, 1000)
    restored.wall_s = 8.0
    assert restored.tokens_per_s == 20_000 / 8.0
    assert restored.as_dict()["wall_s"] == 8.0 and "2,500" in restored.table()
    assert "tokens/s" in restored.table() and "samples/s" in Summary(unit="samples").table()
    assert Summary(unit="samples").as_dict()["throughput_unit"] == "samples"


def test_eval_label_is_shown_beside_the_eval_loss():
    s = Summary()
    s.record_eval(30, 4.7, "global (outer) parameters, 0 outer steps")
    assert "4.7000 (global (outer) parameters, 0 outer steps)" in s.table()
    assert s.as_dict()["eval_of"] == "global (outer) parameters, 0 outer steps"


def test_fault_section_counts_kinds_detection_recovery_and_redone_steps():
    events = [{"step": 20, "event": "fault_injected", "kind": "crash", "rank": 1},
              {"step": 20, "event": "fault_detected", "detection_s": 0.25, "dead": [1], "hung": []},
              {"step": 20, "event": "recovered", "recovery_s": 2.0, "steps_lost": 0},
              {"step": 30, "event": "fault_injected", "kind": "driver_crash", "rank": None},
              {"step": 25, "event": "resumed", "from_step": 25, "steps_redone": 4}]
    section = fault_section(events)
    assert [f["kind"] for f in section["injected"]] == ["crash", "driver_crash"]
    assert (section["detected"], section["recovered"], section["resumes"], section["steps_redone"]) == (1, 1, 1, 4)
    lines = fault_lines(section)
    assert "crash on worker 1 at step 20" in lines[0] and "driver_crash at step 30" in lines[0]
    assert "1 detected in 0.25 s" in lines[1] and "4 step(s) redone" in lines[1]
    assert fault_lines(fault_section([])) == []


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rewrite_up_to_drops_superseded_metric_rows_keeps_events_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "time_s": s / 10, "train/loss": 1.0} for s in range(1, 9)]
    rows.insert(5, {"step": 5, "time_s": 0.5, "event": "checkpoint", "path": "x"})
    rows.append({"step": 8, "time_s": 0.85, "event": "fault_injected", "kind": "driver_crash"})
    _write(path, rows)
    with open(path, "a") as f:
        f.write('{"step": 9, "time_')  # torn by the crash
    superseded, last_time, seen = rewrite_up_to(path, 5)
    assert (superseded, last_time, seen) == (3, 0.85, 8)
    kept = read_records(path)
    assert [r["step"] for r in kept if "event" not in r] == [1, 2, 3, 4, 5]
    assert [r["event"] for r in kept if "event" in r] == ["checkpoint", "fault_injected"]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_resumed_sink_continues_the_clock_and_sends_wandb_each_step_once(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": s, "time_s": 10.0 + s, "train/loss": 1.0} for s in range(1, 9)])
    sink = MetricsSink(tmp_path, _Logging(), 10, 5, "id", "t", {}, resume=True)
    sink.wandb = recorder = _Recorder()
    for step in range(6, 11):
        sink.log(step, {"train/loss": 0.5}, advance=1)
    sink.close()
    rows = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and times[5] >= 18.0
    assert recorder.steps == [9, 10] and sink.superseded == 3


def test_rewind_within_a_run_supersedes_rows_after_the_checkpoint(tmp_path):
    sink = MetricsSink(tmp_path, _Logging(), 10, 0, "id", "t", {})
    sink.wandb = recorder = _Recorder()
    for step in range(1, 7):
        sink.log(step, {"train/loss": 1.0}, advance=1)
    assert sink.rewind(4) == 2
    for step in range(5, 8):
        sink.log(step, {"train/loss": 0.5}, advance=1)
    sink.close()
    steps = [r["step"] for r in read_records(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 8)) and recorder.steps == [1, 2, 3, 4, 5, 6, 7]


def test_log_lines_go_through_tqdm_write_so_they_do_not_glue_onto_the_bar(monkeypatch):
    from tqdm import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    handler = BarLogHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("raylane.test_bar")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("fault injected: crash on worker 1 at step 20")
    finally:
        logger.removeHandler(handler)
    assert written == ["WARNING fault injected: crash on worker 1 at step 20"]


def test_ctrl_c_says_where_it_stopped_and_how_to_continue(monkeypatch, capsys):
    assert str(Interrupted(37, 25)) == ("stopped at step 37; run the same command to continue from the "
                                        "checkpoint at step 25")
    assert "starts over" in str(Interrupted(3, None))

    def interrupted(jobs):
        raise Interrupted(37, 25)

    monkeypatch.setattr(train, "run_jobs", interrupted)
    assert train._connect_and_run([]) == train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped at step 37" in err


def test_progress_bar_is_told_which_workers_a_silent_round_waits_on(monkeypatch):
    from raylane.orchestrator import worker_group
    from raylane.orchestrator.worker_group import WorkerFailure, WorkerGroup

    shown = []
    group = WorkerGroup.__new__(WorkerGroup)
    group.on_wait, group._ref_rank = shown.append, {"ref2": 2, "ref3": 3}
    monkeypatch.setattr(worker_group.time, "monotonic", lambda: 130.0)
    group._report_wait(["ref2"], start=129.0, deadline=160.0, failure=WorkerFailure())
    assert shown == []  # silent for 1 s: nothing to say yet
    group._report_wait(["ref2", "ref3"], start=100.0, deadline=160.0, failure=WorkerFailure(errored={0}))
    assert shown == ["waiting on worker 2, 3: silent 30 s of 60 s (1 failed)"]
