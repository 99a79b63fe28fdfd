"""The run directory: where a run lives, what `resume` means there, and never touching what is not ours.

`check(cfg)` runs at config validation, before Ray starts and before anything is written. It
decides what the run will do with its directory and raises a one-line `ConfigError` when it
must not go on:

- `<run.root>/<run.name>` must resolve inside `run.root` (a path elsewhere is `run.dir`);
- an existing, non-empty folder that is not a raylane run (no `config.yaml`, no `metrics.jsonl`)
  is neither used nor moved; nor is the current directory or a folder that holds it;
- `resume=true` needs a valid checkpoint; `resume=auto` continues an unfinished run (a
  checkpoint, no `summary.yaml`) and otherwise starts fresh;
- a checkpoint is resumed only by a config that can load it (same model, data shapes,
  optimizer and strategy).

`prepare_run_dir(cfg)` (the Coordinator, at start) checks again, resolves `resume=auto`, moves
a finished run aside (`<dir>.<time>`), creates the directory and cleans up after checkpoint
saves that crashed.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from raylane.orchestrator import checkpoint
from raylane.validation import check as require

log = logging.getLogger(__name__)

MARKERS = ("config.yaml", "metrics.jsonl")  # a folder with one of these is a raylane run
# What decides the shapes of a checkpoint's tensors: a resume must agree on each of these.
STATE_KEYS = ("model.name", "model.n_layer", "model.d_model", "model.n_head", "model.hidden", "data.name",
              "data.path", "data.seq_len", "data.input_dim", "data.num_classes", "optim.name", "strategy.name")


def looks_like_run(path: Path) -> bool:
    return any((path / m).is_file() for m in MARKERS)


def _key(cfg: Any) -> tuple[str, Any]:
    """The config key the user set the directory with, for error messages."""
    return ("run.dir", cfg.run.dir) if cfg.run.dir else ("run.name", cfg.run.name)


def check(cfg: Any) -> bool:
    """Whether the run will resume (`resume=auto` resolved); ConfigError when it must not start."""
    path = cfg.run.path()
    key, value = _key(cfg)
    if not cfg.run.dir:
        root = cfg.run.root_path()
        require(path.parent == root, key, value, f"the run dir {path} resolves outside run.root={str(root)!r}; "
                                                 "give a path elsewhere as run.dir")
    require(not path.exists() or path.is_dir(), key, value, f"{path} is a file, not a folder")
    used = path.is_dir() and any(path.iterdir())
    require(not used or looks_like_run(path), key, value,
            f"{path} is not empty and is not a raylane run (no {' or '.join(MARKERS)}); it is never used or "
            "moved aside: choose a new or empty folder")
    found = checkpoint.latest(path / "checkpoints") if used else None
    resume = cfg.resume
    if resume == "auto":
        resume = found is not None and not (path / "summary.yaml").exists()
    require(not resume or found is not None, "resume", cfg.resume,
            f"no valid checkpoint in {path / 'checkpoints'}; resume=auto or resume=false starts a fresh run")
    if resume:
        _check_compatible(cfg, found[1].get("config") or {}, found[0])
    elif used:
        cwd = Path.cwd().resolve()
        require(path != cwd and path not in cwd.parents, key, value,
                f"{path} holds a run but is the current directory (or holds it), so it is never moved aside; "
                "use resume=true, or another run.dir")
    return bool(resume)


def _check_compatible(cfg: Any, saved: dict[str, Any], where: Path) -> None:
    now = cfg.to_dict()
    for dotted in STATE_KEYS:
        section, name = dotted.split(".")
        mine, theirs = now.get(section, {}).get(name), saved.get(section, {}).get(name)
        require(mine == theirs, dotted, mine, f"the checkpoint {where} was saved with {dotted}={theirs!r} and "
                                              "cannot be loaded; resume with that value, or resume=false to "
                                              "start a new run (the old one is moved aside)")


def prepare_run_dir(cfg: Any) -> Path:
    """Check, resolve `resume=auto`, move a finished run aside, create the dir. Returns it."""
    resume = check(cfg)
    path = cfg.run.path()
    if resume and cfg.resume == "auto":
        log.info("%s holds an unfinished run: resuming it (resume=false to start over)", path)
    cfg.resume = resume
    if not resume and looks_like_run(path):
        aside = _aside(path)
        finished = (path / "summary.yaml").exists()
        shutil.move(str(path), str(aside))
        log.warning("%s already held a %s; moved it to %s%s", path, "finished run" if finished else "run", aside,
                    "" if finished else " (resume=true continues an unfinished run instead)")
    path.mkdir(parents=True, exist_ok=True)
    checkpoint.cleanup(path / "checkpoints")
    return path


def _aside(path: Path) -> Path:
    """A name next to `path` that does not exist yet."""
    base = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    aside, n = base, 1
    while aside.exists():
        aside, n = base.with_name(f"{base.name}-{n}"), n + 1
    return aside

