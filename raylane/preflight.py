"""Checks of a run's surroundings at config validation: reads only, before Ray starts.

`check(cfg)` raises a one-line `ConfigError` (exit code 2) for what would otherwise fail
later with a traceback, after Ray started and directories were made:
- the run directory's parent (`run.root`, or the parent of `run.dir`) must be a writable
  folder or creatable under one: not a file, not on a read-only or foreign-owned path;
- `logging.wandb_mode=online` needs a W&B API key: $WANDB_API_KEY, $WANDB_IDENTITY_TOKEN_FILE,
  or an entry for the W&B host ($WANDB_BASE_URL, default api.wandb.ai) in ~/.netrc ($NETRC).
Nothing is created, written or moved here.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raylane.validation import check as require

WANDB_DEFAULT_URL = "https://api.wandb.ai"


def check(cfg: Any) -> None:
    check_run_parent(cfg.run)
    check_wandb_key(cfg.logging)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_parent(run: Any) -> None:
    """The folder the run dir goes in exists as a writable folder, or can be created."""
    key, value = ("run.dir", run.dir) if run.dir else ("run.root", run.root)
    target = run.path().parent
    there = _nearest_existing(target)
    if there == target:
        require(there.is_dir(), key, value, f"{there} exists and is a file, not a folder")
        require(os.access(there, os.W_OK | os.X_OK), key, value,
                f"{there} is not writable by this user; choose a folder you can write to")
        return
    require(there.is_dir(), key, value, f"{target} cannot be created: {there} is a file, not a folder")
    require(os.access(there, os.W_OK | os.X_OK), key, value,
            f"{target} cannot be created: {there} is not writable by this user; choose a folder you can write to")


def wandb_host() -> str:
    return urlsplit(os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL).netloc


def _netrc_has(host: str) -> bool:
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def check_wandb_key(logging_cfg: Any) -> None:
    """W&B online needs credentials wandb itself would find, or it stops to prompt (or fails) mid-start."""
    if logging_cfg.wandb_mode != "online":
        return
    host = wandb_host()
    found = (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
             or _netrc_has(host))
    require(bool(found), "logging.wandb_mode", "online",
            f"no W&B API key: set WANDB_API_KEY (or run `wandb login`, which writes ~/.netrc for {host}), "
            "or use logging.wandb_mode=offline")
