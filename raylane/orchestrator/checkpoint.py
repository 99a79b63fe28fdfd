"""Atomic, checksummed checkpoints, and finding the newest good one.

Layout: `<run.dir>/checkpoints/step_<k>/` holding one torch file per part
(`driver.pt`, `replica.pt` or `replica_<r>.pt`, `local_<r>.pt`) and `meta.json`
(step, resolved config, sha256 of every part). A checkpoint is written into a hidden
temporary folder, flushed, then renamed into place: a crash leaves either the whole
checkpoint or none. `latest()` verifies checksums and, when the newest checkpoint is
corrupt or half-written, warns and falls back to the previous one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

META = "meta.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(root: Path, step: int, parts: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write parts (name -> picklable state) as checkpoint `step`; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    checksums = {}
    for name, state in parts.items():
        buf = io.BytesIO()
        torch.save(state, buf)
        _write(tmp / f"{name}.pt", buf.getvalue())
        checksums[f"{name}.pt"] = _sha256(tmp / f"{name}.pt")
    meta = {**meta, "step": step, "files": checksums, "saved_at": time.time()}
    _write(tmp / META, json.dumps(meta, indent=1, default=str).encode())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's meta if every part is present and matches its checksum; else raise."""
    meta_path = path / META
    if not meta_path.is_file():
        raise ValueError(f"{path}: no {META} (half-written?)")
    meta = json.loads(meta_path.read_text())
    for name, digest in meta["files"].items():
        part = path / name
        if not part.is_file():
            raise ValueError(f"{path}: missing {name}")
        if _sha256(part) != digest:
            raise ValueError(f"{path}: {name} does not match its checksum (corrupt)")
    return meta


def latest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    for path in sorted(root.glob("step_*"), reverse=True):
        try:
            return path, verify(path)
        except (ValueError, json.JSONDecodeError, KeyError) as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def load_part(path: Path, name: str) -> Any:
    return torch.load(path / f"{name}.pt", map_location="cpu", weights_only=False)
