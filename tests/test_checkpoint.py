"""Checkpoints are atomic and checksummed; a corrupt or half-written newest one falls back to the previous."""

import logging

import pytest
import torch

from raylane.orchestrator import checkpoint

pytestmark = pytest.mark.timeout(60)


def _save(root, step):
    return checkpoint.save(root, step, {"driver": {"step": step}, "replica": {"w": torch.full((4,), float(step))}},
                           {"config": {}}, keep=3)


def test_latest_returns_newest_verified_checkpoint(tmp_path):
    for step in (5, 10):
        _save(tmp_path, step)
    path, meta = checkpoint.latest(tmp_path)
    assert meta["step"] == 10
    assert checkpoint.load_part(path, "replica")["w"][0].item() == 10.0


def test_corrupt_latest_checkpoint_falls_back_to_previous_with_warning(tmp_path, caplog):
    _save(tmp_path, 5)
    newest = _save(tmp_path, 10)
    data = bytearray((newest / "replica.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "replica.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        path, meta = checkpoint.latest(tmp_path)
    assert meta["step"] == 5
    assert "checksum" in caplog.text


def test_half_written_checkpoint_is_ignored(tmp_path):
    _save(tmp_path, 5)
    newest = _save(tmp_path, 10)
    (newest / "meta.json").unlink()  # as if the process died before the metadata landed
    assert checkpoint.latest(tmp_path)[1]["step"] == 5


def test_only_the_newest_keep_checkpoints_remain_and_no_temp_dirs(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]
