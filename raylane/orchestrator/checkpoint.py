"""Atomic, checksummed checkpoints, and finding the newest good one.

Layout: `<run.dir>/checkpoints/step_<k>/` holding one torch file per part
(`driver.pt`, one `<state key>.pt` per key of the strategy's layout, e.g. `replica.pt` or
`replica_<r>.pt`, and `local_<r>.pt`) and `meta.json`
(step, resolved config, sha256 of every part). A checkpoint is written into a hidden
temporary folder, flushed, then renamed into place: a crash leaves either the whole
checkpoint or none. Re-saving a step that exists first renames the old folder aside
(`.old-step_<k>-<pid>`), then renames the new one in, then deletes the old one; `cleanup()`
at the next start removes temp folders of crashed saves and puts back an old folder whose
replacement never landed. `latest()` verifies checksums and, when the newest checkpoint is
corrupt or half-written, warns and falls back to the previous one.

Parts hold only tensors and plain Python types (dict, list, tuple, str, int, float, bool,
None) and are loaded with `torch.load(weights_only=True)`: the checksums prove integrity,
not origin, so a part that holds anything else (a pickled object that could run code on
load) is refused (`CheckpointError`) and nothing in it runs.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

META = "meta.json"
TMP, OLD = ".tmp-", ".old-"  # prefixes of a save in progress / of a step being replaced


class CheckpointError(ValueError):
    """A checkpoint part that is not plain tensors and types: refused, never unpickled."""


# What torch's weights-only unpickler accepts (tests/test_checkpoint_safety.py checks the list against it).
PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.dtype, torch.device)
CONTAINERS = (dict, collections.OrderedDict, list, tuple, set)


def check_plain(obj: Any, where: str) -> None:
    """Raise CheckpointError naming the first value in `obj` a weights-only load would refuse."""
    if type(obj) in PLAIN or type(obj) in (torch.Tensor, torch.nn.Parameter):
        return
    if type(obj) not in CONTAINERS:
        raise CheckpointError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not a tensor or "
                              "plain type, so the checkpoint could not be loaded with weights_only=True; "
                              "convert it in the state_dict() that returned it")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        if isinstance(obj, dict):
            check_plain(key, f"{where} (key {key!r})")
        check_plain(value, f"{where}[{key!r}]")


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
    """Write parts (name -> tensors and plain types) as checkpoint `step`; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"{TMP}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        checksums = {}
        for name, state in parts.items():
            check_plain(state, name)
            buf = io.BytesIO()
            torch.save(state, buf)
            _write(tmp / f"{name}.pt", buf.getvalue())
            checksums[f"{name}.pt"] = _sha256(tmp / f"{name}.pt")
        meta = {**meta, "step": step, "files": checksums, "saved_at": time.time()}
        _write(tmp / META, json.dumps(meta, indent=1, default=str).encode())
        _replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep)
    return final


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. An existing `final` is renamed aside first and deleted only once the
    new one is in place, so a crash in between leaves it recoverable (`cleanup` puts it back)."""
    old = final.with_name(f"{OLD}{final.name}-{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cleanup(root: Path) -> None:
    """At the start of a run: delete temp folders of crashed saves; an old step folder whose
    replacement never landed is put back, otherwise deleted."""
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith(TMP):
            log.warning("removing %s, left by a save that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(OLD):
            final = root / path.name[len(OLD):].rsplit("-", 1)[0]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                log.warning("restoring %s: a re-save of it did not finish", final)
                os.rename(path, final)


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's meta if every part is present and matches its checksum; else raise."""
    meta_path = path / META
    if not meta_path.is_file():
        raise ValueError(f"{path}: no {META} (half-written?)")
    meta = json.loads(meta_path.read_text())
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(d, str) for d in files.values()):
        raise ValueError(f"{path}: {META} lists no parts ({META} damaged or not raylane's)")
    for name, digest in files.items():
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
    """One part, unpickled with torch's weights-only loader: tensors and plain types, nothing else."""
    try:
        return torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(f"{path / name}.pt holds more than tensors and plain types; refused to load it "
                              f"(a checkpoint from an untrusted source?) {reason}".strip()) from None
