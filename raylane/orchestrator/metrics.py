"""One sink for everything measured: metrics.jsonl, a live progress bar, and W&B.

`MetricsSink.log(step, metrics)` appends a JSON line (every call) and forwards to the
progress bar (a live bar on a terminal; one plain line every tenth of the run or 30 s when stderr
is not a terminal, e.g. under `ray job submit`) and W&B. Keys carry their prefix (train/, eval/, comm/, faults/...).
Disabled parts are null objects, so callers never branch. W&B runs on the driver only
(workers send their metrics here), offline by default into `<run.dir>/wandb`.

Each step appears once: when a run goes back to a checkpoint at step k (a resume, or an
in-run recovery from a checkpoint), `rewind(k)` atomically rewrites metrics.jsonl without the
metric rows after k (event rows are kept: they are the run's history), and W&B is not sent a
step it has already seen. `time_s` is the run's training clock: it continues from the file's
last time after a resume, so it never goes back (`elapsed_s()` is the same clock).
Log lines go through `BarLogHandler` (tqdm's writer), so they never glue onto the bar.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class _NullBar:
    def update(self, n: int, postfix: dict[str, Any]) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def goto(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _ThroughBar:
    """A stand-in for sys.stdout / sys.stderr while the bar is drawn: whole lines written by anyone else
    (Ray's `(raylet)` and worker lines, a print) go out through tqdm, above the bar, never onto it."""

    def __init__(self, stream: Any):
        import threading

        self.stream, self.pending, self.lock = stream, "", threading.Lock()

    def write(self, text: str) -> int:
        from tqdm import tqdm

        with self.lock:
            lines = (self.pending + text).split("\n")
            self.pending = lines.pop()
        for line in lines:
            tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:  # a part line waits for its end (or for `drain`)
        self.stream.flush()

    def drain(self) -> None:
        with self.lock:
            rest, self.pending = self.pending, ""
        if rest:
            self.stream.write(rest)
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the real stream's
        return getattr(self.stream, name)


class _Bar:
    def __init__(self, total: int, initial: int, stream: Any = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=stream or sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _ThroughBar(sys.stdout), _ThroughBar(sys.stderr)

    def update(self, n: int, postfix: dict[str, Any]) -> None:
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def status(self, text: str) -> None:
        """What the run waits on, in place of the description ("" restores it)."""
        self.bar.set_description_str(text or "train", refresh=True)

    def goto(self, step: int) -> None:
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        for wrapper in (sys.stdout, sys.stderr):
            if isinstance(wrapper, _ThroughBar):
                wrapper.drain()
        sys.stdout, sys.stderr = self.saved


class _LineBar:
    """Progress without a terminal (`ray job submit`, a pipe, a file): one plain line every
    `every_steps` steps (a tenth of the run) or `every_s` seconds, and at the last step; no
    carriage returns, so a job log gets a line, not a redrawn bar."""

    def __init__(self, total: int, initial: int, every_s: float = 30.0, stream: Any = None):
        self.total, self.n, self.every_s = total, initial, every_s
        self.every_steps = max(1, total // 10)
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.last_n, self.last_t = initial, time.monotonic()

    def update(self, n: int, postfix: dict[str, Any]) -> None:
        self.n += n
        self.postfix.update(postfix)
        now = time.monotonic()
        if n and (self.n - self.last_n >= self.every_steps or now - self.last_t >= self.every_s
                  or self.n == self.total):
            rate = (self.n - self.last_n) / max(now - self.last_t, 1e-9)
            shown = " ".join(f"{k} {v}" for k, v in self.postfix.items())
            print(f"train step {self.n}/{self.total} {shown} ({rate:.2f} steps/s)".replace("  ", " "),
                  file=self.stream, flush=True)
            self.last_n, self.last_t = self.n, now

    def status(self, text: str) -> None:
        if text:
            print(f"train: {text}", file=self.stream, flush=True)

    def goto(self, step: int) -> None:
        self.n = self.last_n = step

    def close(self) -> None:
        pass


def progress(total: int, initial: int, enabled: bool, stream: Any = None) -> Any:
    """The live bar on a terminal, plain lines elsewhere, nothing when disabled."""
    stream = stream or sys.stderr
    if not enabled:
        return _NullBar()
    isatty = getattr(stream, "isatty", None)
    return _Bar(total, initial, stream) if isatty is not None and isatty() else _LineBar(total, initial, stream=stream)


class BarLogHandler(logging.StreamHandler):
    """A log handler that writes through tqdm, so a line never lands on the progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _NullWandb:
    run_dir: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class _Wandb:
    def __init__(self, logging_cfg: Any, run_dir: Path, run_id: str, name: str, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        tags = [config.get("strategy", {}).get("name", "?"), *logging_cfg.tags]
        self.run = wandb.init(project=logging_cfg.project, entity=logging_cfg.entity, dir=str(run_dir),
                              mode=logging_cfg.wandb_mode, id=run_id, name=name, resume="allow",
                              group=logging_cfg.group or name, tags=tags, config=config,
                              settings=wandb.Settings(console="off", quiet=True, silent=True))
        self.run_dir = self.run.dir

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl; a torn or foreign line (a crash mid-write) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def rewrite_up_to(path: Path, step: int) -> tuple[int, float, int]:
    """Drop the metric rows after `step` (events stay), atomically (temp file + fsync + rename).

    Returns (train steps superseded, the file's last time_s, the highest step it held)."""
    if not path.is_file():
        return 0, 0.0, 0
    records = read_records(path)
    last_time = max((r.get("time_s") or 0.0 for r in records), default=0.0)
    seen = max((r["step"] for r in records if "event" not in r), default=0)
    kept = [r for r in records if "event" in r or r["step"] <= step]
    superseded = sum(1 for r in records if "train/loss" in r and r["step"] > step)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return superseded, last_time, seen


class MetricsSink:
    def __init__(self, run_dir: Path, logging_cfg: Any, total_steps: int, start_step: int,
                 run_id: str, name: str, config: dict[str, Any], resume: bool = False):
        """`resume`: continue this run's metrics.jsonl from `start_step` (rows after it are
        superseded); otherwise the file is appended to as it is."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.superseded, self.time_offset, self.wandb_floor = 0, 0.0, 0
        if resume:
            self.superseded, self.time_offset, self.wandb_floor = rewrite_up_to(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)
        self.bar = progress(total_steps, start_step, logging_cfg.progress)
        self.wandb = (_NullWandb() if logging_cfg.wandb_mode == "disabled"
                      else _Wandb(logging_cfg, run_dir, run_id, name, config))
        self.t0 = time.time()

    def start_clock(self) -> None:
        """The training clock starts now (the workers are up): worker start-up is not training time."""
        self.t0 = time.time()

    def elapsed_s(self) -> float:
        """The run's training clock: this process's time plus that of the run's earlier sessions."""
        return self.time_offset + time.time() - self.t0

    def rewind(self, step: int) -> int:
        """Back to a checkpoint at `step` within this process: rows after it are superseded."""
        self._file.close()
        superseded, _, seen = rewrite_up_to(self.path, step)
        self.wandb_floor = max(self.wandb_floor, seen)
        self._file = open(self.path, "a", buffering=1)
        self.bar.goto(step)
        return superseded

    def status(self, text: str) -> None:
        """Show what the run waits on in the progress bar ("" clears it)."""
        self.bar.status(text)

    def log(self, step: int, metrics: dict[str, Any], advance: int = 0) -> None:
        record = {"step": step, "time_s": round(self.elapsed_s(), 4), **_clean(metrics)}
        self._file.write(json.dumps(record) + "\n")
        if step > self.wandb_floor:  # W&B refuses a step below its last one: send each step once
            self.wandb.log(metrics, step)
        if advance or "eval/loss" in metrics:
            shown = {k.split("/")[0]: f"{v:.4g}" for k, v in metrics.items()
                     if k in ("train/loss", "eval/loss") and v is not None}
            self.bar.update(advance, shown)

    def event(self, step: int, name: str, **fields: Any) -> None:
        """A discrete event (fault, recovery, checkpoint) as its own JSON line (not sent to W&B:
        its numbers are logged as `faults/` metrics by the caller)."""
        record = {"step": step, "time_s": round(self.elapsed_s(), 4), "event": name, **_clean(fields)}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()
        self.wandb.finish()
        self._file.close()
