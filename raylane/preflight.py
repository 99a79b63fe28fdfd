"""Checks of a run's surroundings at config validation: reads only, before Ray starts.

`check(cfg)` raises a one-line `ConfigError` (exit code 2) for what would otherwise fail
later with a traceback, after Ray started and directories were made:
- the run directory's parent (`run.root`, or the parent of `run.dir`) must be a writable
  folder or creatable under one: not a file, not on a read-only or foreign-owned path, not on a
  kernel pseudo-filesystem (/proc, /sys: writable-looking to root, but no place for files);
- `cluster.gpus_per_worker > 0` on an embedded local cluster needs that many GPUs on this host;
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
    check_local_gpus(cfg.cluster)


def local_gpu_count() -> int:
    """GPUs this process's torch can use (0 with the CPU wheel)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_local_gpus(cluster: Any) -> None:
    """An embedded local cluster (no cluster.address, no $RAY_ADDRESS) can place GPU workers only on
    this host's GPUs: too few is one line now, not a start timeout of autoscaler errors."""
    if cluster.gpus_per_worker <= 0 or cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    need, have = cluster.num_workers * cluster.gpus_per_worker, local_gpu_count()
    require(have >= need, "cluster.gpus_per_worker", cluster.gpus_per_worker,
            f"{cluster.num_workers} workers need {need:g} GPUs but this host has {have} usable by torch (no "
            "cluster.address / RAY_ADDRESS, so the run uses this host only); with GPUs, install the CUDA torch "
            "(`make setup-gpu`); without, use cluster=local")


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
    else:
        require(there.is_dir(), key, value, f"{target} cannot be created: {there} is a file, not a folder")
        require(os.access(there, os.W_OK | os.X_OK), key, value,
                f"{target} cannot be created: {there} is not writable by this user; choose a folder you can write to")
    fs = pseudo_filesystem(there)  # looks writable (to root), holds no files
    require(fs is None, key, value, f"{there} is on a {fs} pseudo-filesystem (kernel state, not storage: even root "
                                    "cannot keep a run there); choose a folder on a disk")


PSEUDO_FS = ("proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
             "configfs", "pstore", "bpf", "mqueue", "hugetlbfs", "fusectl", "binfmt_misc", "autofs", "efivarfs")


def pseudo_filesystem(path: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the kernel pseudo-filesystem (proc, sysfs, ...) `path` lies on, else None.
    Such a folder may look writable (to root every path does) yet cannot hold files."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    resolved = str(path.resolve())
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype if fstype in PSEUDO_FS else None


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
