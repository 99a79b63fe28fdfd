"""One sink for everything measured: metrics.jsonl, a live progress bar, and W&B.

`MetricsSink.log(step, metrics)` appends a JSON line (every call) and forwards to the
progress bar and W&B. Keys carry their prefix (train/, eval/, comm/, faults/...).
Disabled parts are null objects, so callers never branch. W&B runs on the driver only
(workers send their metrics here), offline by default into `<run.dir>/wandb`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class _NullBar:
    def update(self, n: int, postfix: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int, postfix: dict[str, Any]) -> None:
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


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


class MetricsSink:
    def __init__(self, run_dir: Path, logging_cfg: Any, total_steps: int, start_step: int,
                 run_id: str, name: str, config: dict[str, Any]):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self.bar = _Bar(total_steps, start_step) if logging_cfg.progress else _NullBar()
        self.wandb = (_NullWandb() if logging_cfg.wandb_mode == "disabled"
                      else _Wandb(logging_cfg, run_dir, run_id, name, config))
        self.t0 = time.time()

    def log(self, step: int, metrics: dict[str, Any], advance: int = 0) -> None:
        record = {"step": step, "time_s": round(time.time() - self.t0, 4), **_clean(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self.wandb.log(metrics, step)
        if advance or "eval/loss" in metrics:
            shown = {k.split("/")[0]: f"{v:.4g}" for k, v in metrics.items()
                     if k in ("train/loss", "eval/loss") and v is not None}
            self.bar.update(advance, shown)

    def event(self, step: int, name: str, **fields: Any) -> None:
        """A discrete event (fault, recovery, checkpoint) as its own JSON line (not sent to W&B:
        its numbers are logged as `faults/` metrics by the caller)."""
        record = {"step": step, "time_s": round(time.time() - self.t0, 4), "event": name, **_clean(fields)}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()
        self.wandb.finish()
        self._file.close()
