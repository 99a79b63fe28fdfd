"""A newcomer's first hour, round 3: the last unclean inputs are one line and exit 2 before Ray
starts; settings that cannot show their strategy's effect warn at start-up; the summary says what
the strategy did (from the metrics the bar and W&B get)."""

import json
import logging
import os

import pytest

from raylane import config, train
from raylane.orchestrator import summary_sections
from raylane.orchestrator.summary import Summary
from raylane.preflight import pseudo_filesystem
from tests.conftest import SMALL

pytestmark = pytest.mark.timeout(120)


def _error(capsys, *overrides):
    assert train.main([*SMALL, *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("name", ["~"])
def test_run_name_starting_with_tilde_is_refused(no_ray, capsys, tmp_path, name):
    line = _error(capsys, f"run.root={tmp_path}", f"run.name='{name}'")
    assert "run.name=" in line, line
    assert not (tmp_path / name).exists()


def test_run_root_on_a_kernel_pseudo_filesystem_is_refused(no_ray, capsys):
    line = _error(capsys, "run.root=/proc/raylane-runs")
    assert "run.root='/proc/raylane-runs'" in line and ("pseudo-filesystem" in line or "not writable" in line), line


def test_pseudo_filesystem_reads_the_longest_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nproc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\n"
                      "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n")
    from pathlib import Path

    assert pseudo_filesystem(Path("/proc/1/x"), str(mounts)) == "proc"
    assert pseudo_filesystem(Path("/sys"), str(mounts)) == "sysfs"
    assert pseudo_filesystem(Path("/sys/fs/cgroup/a"), str(mounts)) is None
    assert pseudo_filesystem(Path("/processes"), str(mounts)) is None


@pytest.mark.parametrize("content,words", [
    ("", "is empty"),
    ("round,w0,w1\n0,0.5,0.7\n1,0.4,fast\n", "line 3: 'fast' is not a number"),
])
def test_unusable_straggler_trace_is_one_line_error(no_ray, capsys, tmp_path, monkeypatch, content, words):
    trace = tmp_path / "trace.csv"
    trace.write_text(content)
    monkeypatch.setenv("RAYLANE_STRAGGLER_TRACE", str(trace))
    line = _error(capsys, f"run.root={tmp_path / 'runs'}", "faults=stragglers_lambda")
    assert "faults.events[0].straggler.trace=" in line and words in line, line


def test_trace_problem_names_the_line_and_cell(tmp_path):
    from raylane.stragglers import trace_problem

    cases = {"": "is empty", "round,w0\n": "no rounds", "round,w0,w1\n0,0.5,-1\n": "line 2: '-1' is not a time",
             "round,w0,w1\n0,0.5,nan\n": "'nan' is not a time", "round,w0,w1\n0,0.5,0.7\n": None}
    for i, (content, words) in enumerate(cases.items()):
        path = tmp_path / f"t{i}.csv"
        path.write_text(content)
        problem = trace_problem(str(path))
        assert (problem is None) if words is None else (words in problem), (content, problem)


def _run_with_damaged_checkpoint(tmp_path):
    run = tmp_path / "runs" / "r"
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (step / "meta.json").write_text(json.dumps({"step": 4, "files": []}))
    return run


def test_damaged_checkpoint_meta_does_not_stop_a_fresh_start(tmp_path):
    _run_with_damaged_checkpoint(tmp_path)
    cfg = config.load([*SMALL, f"run.root={tmp_path / 'runs'}", "run.name=r"])  # resume=auto: starts fresh
    assert cfg.resume == "auto"


def test_damaged_checkpoint_meta_with_resume_true_is_one_line_error(no_ray, capsys, tmp_path):
    """The warning says which checkpoint was skipped and why; the error is the one line after it."""
    _run_with_damaged_checkpoint(tmp_path)
    assert train.main([*SMALL, f"run.root={tmp_path / 'runs'}", "run.name=r", "resume=true"]) == 2
    warning, line = capsys.readouterr().err.strip().splitlines()
    assert "skipping checkpoint" in warning and "meta.json lists no parts" in warning, warning
    assert line.startswith("error: resume=True") and "no valid checkpoint" in line, line


@pytest.mark.parametrize("overrides,words", [
    (["strategy=gc"], "strategy.scheme=gc with no straggler plan"),
    (["strategy=robust", "faults=byzantine"], "strategy.f=0"),
    (["strategy=hsdp"], "cluster.ranks_per_replica=1"),
    (["strategy=lgreco", "train.steps=40"], "ends before L-GreCo re-plans once"),
    (["strategy=gnnpipe", "model=gcnii", "data=csbm", "train.steps=10", "optim.warmup_steps=20",
      "cluster.num_workers=2"], "learning-rate warm-up"),
])
def test_a_setting_that_cannot_show_its_strategys_effect_warns(caplog, tmp_path, overrides, words):
    small = [] if "strategy=gnnpipe" in overrides else SMALL
    with caplog.at_level(logging.WARNING, logger="raylane"):
        config.load([*small, f"run.root={tmp_path}", *overrides])
    assert any(words in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_setting_that_shows_the_effect_does_not_warn(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="raylane"):
        config.load([*SMALL, f"run.root={tmp_path}", "strategy=gc", "faults=stragglers_bursty"])
        config.load([*SMALL, f"run.root={tmp_path}", "strategy=lgreco", "train.steps=200"])
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_summary_sections_come_from_the_logged_metrics_and_survive_a_checkpoint():
    s = Summary()
    for step in range(1, 4):
        s.record_metrics({"gc/stragglers": 2, "gc/violation": int(step == 2), "gc/wait_s": 0.5,
                          "robust/byzantine_rows": 1.0, "robust/dropped_rows": 1.0, "robust/weight/rank0": 0.3,
                          "eval/accuracy": 0.5 + step / 10, "lgreco/bytes_chosen": 100.0,
                          "lgreco/bytes_default": 300.0, "deepspeed/bytes_sent": 2**20,
                          "stragglers/delayed": 1.0, "stragglers/delay_s": 0.25, "stragglers/delay_total_s": 0.25,
                          "stragglers/wait_s": 0.2})
    restored = Summary()
    restored.load_state_dict(s.state_dict())
    rows = dict(summary_sections.section_rows(restored.metric_totals))
    assert rows["stragglers"].startswith("6 stragglers in 3 rounds") and "1 violation(s)" in rows["stragglers"]
    assert rows["attacks"].startswith("3 Byzantine rows in 3 steps") and "3 non-finite rows dropped" in rows["attacks"]
    assert rows["accuracy"] == "final 0.8000 (best 0.8000)"
    assert "3.00x fewer bytes" in rows["plan"] and "3.00 MiB" in rows["replicas"]
    assert rows["faults"].startswith("stragglers: 3 delayed worker-steps in 3 steps, 0.8 s injected")
    assert "robust/weight/rank0" not in restored.metric_totals  # per-rank detail stays in W&B
    assert "6 stragglers" in restored.table() and restored.as_dict()["strategy"]["stragglers"] == rows["stragglers"]
    assert Summary().as_dict()["strategy"] == {}  # nothing logged, no section


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_gc_run_with_a_replayed_trace_logs_stragglers_and_names_them_in_the_summary(ray_cluster, tmp_path,
                                                                                       monkeypatch):
    """faults=stragglers_lambda writes stragglers/ metrics, one straggler event (the faults line, the
    chaos table), and the summary of the gc run names how many stragglers it did not wait for."""
    from raylane.chaos import faults_table
    from raylane.orchestrator.coordinator import run
    from raylane.orchestrator.metrics import read_records

    trace = tmp_path / "trace.csv"  # worker 1 is 8 s slower than the rest in every round: 0.4 s at scale 0.05
    trace.write_text("round,w0,w1,w2,w3\n" + "".join(f"{i},1.0,9.0,1.0,1.0\n" for i in range(4)))
    monkeypatch.setenv("RAYLANE_STRAGGLER_TRACE", str(trace))
    cfg = config.load([*SMALL, f"run.root={tmp_path / 'runs'}", "train.steps=4", "cluster.num_workers=4",
                       "strategy=gc", "strategy.s=1", "faults=stragglers_lambda"])
    summary = run(cfg)
    records = read_records(cfg.run.path() / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    assert all(r["stragglers/delayed"] == 1 and abs(r["stragglers/delay_s"] - 0.4) < 1e-9 for r in steps)
    count = int(sum(r["gc/stragglers"] for r in steps))
    assert count > 0 and f"{count} stragglers in 4 rounds" in summary.table()
    assert "straggler at step 1" in summary.table()
    assert [row["kind"] for row in faults_table([r for r in records if "event" in r])] == ["straggler"]


def test_no_bar_when_not_on_a_terminal_only_a_line_every_tenth_of_the_run():
    import io

    from raylane.orchestrator.metrics import _Bar, _NullBar, progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = io.StringIO()
    bar = progress(100, 0, True, stream=out)
    for step in range(1, 101):
        bar.update(1, {"train": f"{3 - step / 100:.4g}"})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10, lines
    assert lines[-1].startswith("train step 100/100 train 2 (")
    assert isinstance(progress(100, 0, False, stream=out), _NullBar)
    tty = Tty()
    bar = progress(100, 0, True, stream=tty)
    assert isinstance(bar, _Bar)
    bar.close()


def test_lines_printed_by_others_while_the_bar_is_drawn_land_above_it(monkeypatch):
    """Ray prints `(raylet)` and worker lines to sys.stderr from its own thread: never onto the bar."""
    import io
    import sys

    from raylane.orchestrator.metrics import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress(100, 0, True, stream=tty)
    bar.update(5, {"train": "2.5"})
    print("(raylet) a worker line", file=sys.stderr, flush=True)
    sys.stderr.write("half a ")
    sys.stderr.write("line\n")
    bar.close()
    assert sys.stderr is tty
    shown = tty.getvalue()
    assert "\n(raylet) a worker line\n" in shown.replace("\r", "\n"), repr(shown)
    assert "half a line\n" in shown and "train" in shown.split("(raylet)")[-1]  # the bar redrawn below


def test_cluster_gpu_on_a_host_without_gpus_is_one_line_error(no_ray, capsys, tmp_path, monkeypatch):
    from raylane import preflight

    monkeypatch.setattr(preflight, "local_gpu_count", lambda: 0)  # (also on a GPU host)
    line = _error(capsys, f"run.root={tmp_path}", "cluster=gpu")
    assert "cluster.gpus_per_worker=1.0" in line and "need 4 GPUs but this host has 0" in line, line


def test_a_raw_ray_start_failure_is_retried_once_then_one_line(monkeypatch, capsys):
    import ray

    calls = []

    def flaky(*a, **k):
        calls.append(k)
        raise RuntimeError("Failed to register worker to Raylet: IOError\\nmore")

    monkeypatch.setattr(ray, "init", flaky)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(train.RayStartError, match="did not start, twice: Failed to register worker"):
        train.start_local_ray(1)
    assert len(calls) == 2
    tries = iter([RuntimeError("Failed to register worker to Raylet"), None])

    def once(*a, **k):
        err = next(tries)
        if err:
            raise err

    monkeypatch.setattr(ray, "init", once)
    train.start_local_ray(1)  # the first failure is retried; the second try starts
    assert next(tries, "done") == "done"


def test_make_setup_gpu_installs_the_cuda_torch_first_into_a_fresh_venv():
    """The README's GPU path: a venv of its own, the pinned torch from the CUDA index, then raylane
    (installing the CUDA wheel over the CPU one would do nothing: "Requirement already satisfied")."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    lines = subprocess.run(["make", "-n", "-s", "setup-gpu"], cwd=root, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    pin = re.search(r'"(torch==[^"]+)"', (root / "pyproject.toml").read_text()).group(1)
    venv = next(i for i, x in enumerate(lines) if " -m venv .venv-gpu" in x)
    torch_at = next(i for i, x in enumerate(lines) if re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+ "
                                                                 + re.escape(pin) + "$", x))
    project = next(i for i, x in enumerate(lines) if x.endswith("pip install --quiet --disable-pip-version-check -e ."))
    assert venv < torch_at < project and lines[torch_at].startswith(".venv-gpu/bin/python -m pip install")
    assert any("torch.version.cuda" in x for x in lines[project:])  # refuses a CPU wheel
    assert "make setup-gpu" in (root / "README.md").read_text()


def test_a_sweep_ends_with_a_table_of_its_runs():
    from types import SimpleNamespace as NS

    done = [(NS(run=NS(name="ddp__optim.lr=0.001")), NS(train_loss=2.5, eval_loss=2.6, wall_s=10.0)),
            (NS(run=NS(name="ddp__optim.lr=0.003")), NS(train_loss=2.1, eval_loss=None, wall_s=9.5))]
    lines = train.sweep_table(done).strip().splitlines()
    assert lines[0].split() == ["sweep", "run", "final", "train", "final", "eval", "wall", "s"]
    assert lines[1].split() == ["ddp__optim.lr=0.001", "2.5000", "2.6000", "10.0"]
    assert lines[2].split() == ["ddp__optim.lr=0.003", "2.1000", "-", "9.5"]


@pytest.mark.parametrize("preset,shown,hidden", [
    ([], {"n_layer", "n_head", "seq_len"}, {"hidden", "channels", "gnn_alpha", "num_samples", "graph"}),
    (["model=mlp", "data=synthetic"], {"hidden", "num_samples", "input_dim"}, {"n_layer", "n_head", "seq_len"}),
])
def test_cfg_job_shows_only_the_keys_the_chosen_model_and_data_read(no_ray, capsys, tmp_path, preset, shown, hidden):
    import yaml

    assert train.main(["--cfg", "job", f"run.root={tmp_path}", *preset]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    keys = set(printed["model"]) | set(printed["data"])
    assert shown <= keys and not hidden & keys, keys
    assert printed["run"]["dir"] == str(tmp_path / printed["run"]["name"])


def test_a_healthy_workers_gloo_error_is_one_whole_line_without_source_paths():
    from raylane.orchestrator.worker_group import short_error

    gloo = ("ray.exceptions.RayTaskError(RuntimeError): ray::TrainWorker.run()\nRuntimeError: [/__w/pytorch/pytorch/"
            "third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:23448. This is "
            "typically caused by a remote worker crashing. Check the logs of the remote worker before reporting "
            "an error. GLHF!")
    assert short_error(gloo) == ("RuntimeError: Connection closed by peer [127.0.0.1]:23448 (a peer process died "
                                 "or left the group)")
    long = short_error("ValueError: " + "word " * 100)
    assert len(long) <= 204 and long.endswith("word ...")


def test_a_resumed_runs_wandb_sessions_are_synced_into_one_run(tmp_path):
    folder = tmp_path / "wandb"
    (folder / "offline-run-20261207_101500-abc").mkdir(parents=True)
    assert train.wandb_sync_hint(folder) == f"W&B (offline): upload with `wandb sync {folder}/offline-run-*`"
    (folder / "offline-run-20261207_093000-abc").mkdir()  # the first session
    hint = train.wandb_sync_hint(folder)
    assert f"`wandb sync {folder}/offline-run-20261207_093000-abc` then `wandb sync --append " \
           f"{folder}/offline-run-20261207_101500-abc`" in hint and "2 sessions" in hint
