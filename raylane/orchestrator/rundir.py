"""The run directory: decide `resume=auto`, and never overwrite an earlier run."""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from raylane.orchestrator import checkpoint

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: Any) -> None:
    """Decide `resume=auto` and never overwrite a run.

    auto: an unfinished run in run.dir (a checkpoint, no summary.yaml) is continued — so
    re-running the command after a crash resumes it; a finished one is moved aside.
    """
    path = cfg.run.path()
    exists = path.exists() and any(path.iterdir())
    if cfg.resume == "auto":
        unfinished = exists and not (path / "summary.yaml").exists() and \
            checkpoint.latest(path / "checkpoints") is not None
        cfg.resume = unfinished
        if unfinished:
            log.info("%s holds an unfinished run: resuming it (resume=false to start over)", path)
    if cfg.resume or not exists:
        return
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(path), str(aside))
    log.warning("%s already held a run; moved it to %s (use resume=true to continue a run)", path, aside)
