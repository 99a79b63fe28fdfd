"""Checkpoints hold tensors and plain types only and load with torch's weights-only unpickler: a part
replaced by one that would run code (checksum updated) is refused and nothing runs. Workers' RNG
streams and the strategies' states survive that loader. Re-saving a step is atomic, also under a
hard crash, and what crashed saves leave behind is cleaned up at the next start. No Ray."""

import collections
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from raylane.orchestrator import checkpoint
from raylane.orchestrator.rundir import prepare_run_dir
from raylane.strategies.gradient_coding.strategy import CodedDriver, GradientCodingConfig
from raylane.strategies.gradient_coding.sgc import Task
from tests.conftest import small_cfg

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent


def _save(root: Path, step: int, value: float | None = None, config: dict | None = None) -> Path:
    value = float(step) if value is None else value
    parts = {"driver": {"step": step}, "replica": {"w": torch.full((4,), value)}, "local_0": {"n": step}}
    return checkpoint.save(root, step, parts, {"config": config or {}}, keep=3)


def _record(marker: str) -> None:
    Path(marker).write_text("ran")


class RunsCodeOnLoad:
    """What a tampered part could hold: unpickling it calls `_record(marker)`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _record, (self.marker,)


def test_a_tampered_part_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    path = _save(tmp_path / "checkpoints", 5)
    marker = tmp_path / "marker"
    torch.save({"model": RunsCodeOnLoad(marker)}, path / "replica.pt")
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["replica.pt"] = checkpoint._sha256(path / "replica.pt")  # the attacker updates the checksum
    (path / "meta.json").write_text(json.dumps(meta))
    assert checkpoint.latest(tmp_path / "checkpoints")[0] == path, "the checksum alone cannot tell"

    with pytest.raises(checkpoint.CheckpointError, match=r"replica\.pt holds more than tensors"):
        checkpoint.load_part(path, "replica")
    assert not marker.exists()
    torch.load(path / "replica.pt", weights_only=False)  # the payload is live: the full unpickler runs it
    assert marker.read_text() == "ran"


def _worker(tmp_path, *overrides: str):
    from raylane.comm import host_store
    from raylane.workers.worker import TrainWorker

    w = TrainWorker(small_cfg(tmp_path, "cluster.num_workers=1", *overrides), rank=0)
    store = host_store("127.0.0.1", 30)
    w.connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    return w, store


STRATEGIES = {
    "streaming_diloco": ["strategy=streaming_diloco", "model.n_layer=2", "strategy.sync_every=4",
                         "strategy.overlap_steps=2",
                         "strategy.compression={name: fp4, format: e3m0, block_size: 32, stochastic: true, "
                         "error_feedback: true}"],
    "gradient_coding": ["strategy=gradient_coding", "strategy.scheme=uncoded", "strategy.streams=2"],
}


def _advance(w, step: int) -> list[float]:
    """One step of every model the worker holds; their losses. Gradient coding is driver-decided:
    its worker half computes each stream's gradient and applies the (here: its own) decoded one."""
    if w.cfg.strategy.name == "diloco":
        return [w.train_step(step * 4, 1e-2)["loss"]]
    from raylane.comm import CompressionConfig

    losses, wire = [], CompressionConfig().build()
    for stream in range(2):
        coded = w.strategy.gc_compute([(stream, step * 4, [(0, 4, 1.0)])], atoms=4)["vectors"][0]
        w.strategy.gc_apply(stream, wire.compress(torch.from_numpy(coded[:-1].astype(np.float32))), 1e-2)
        losses.append(float(coded[-1]))
    return losses


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_workers_state_loads_weights_only_and_continues_identically(tmp_path, strategy):
    """Model, optimizer, strategy state (diloco: a sync in flight) and the torch/numpy/random streams."""
    import random

    w, store = _worker(tmp_path, *STRATEGIES[strategy])
    try:
        for step in range(1, 6):
            _advance(w, step)
        np.random.randn()  # leave numpy's cached gaussian and Python's gauss_next set
        random.gauss(0, 1)
        state = w.state_dict()
        if strategy == "streaming_diloco":
            assert state["replica"]["strategy"]["outer"]["in_flight"], "the checkpoint should hold a sync in flight"
        path = checkpoint.save(tmp_path / "ck", 5, {"replica": state["replica"], "local_0": state["local"]},
                               {}, keep=1)
        expected_params = w.flat_parameters()
        expected_draws = (torch.rand(3), np.random.randn(3), random.random(), random.gauss(0, 1))
        expected_next = [_advance(w, step) for step in (6, 7)]

        fresh, store2 = _worker(tmp_path, *STRATEGIES[strategy])
        try:
            fresh.load_state_dict(*(torch.load(path / f"{n}.pt", weights_only=True) for n in ("replica", "local_0")))
            assert torch.equal(fresh.flat_parameters(), expected_params)
            draws = (torch.rand(3), np.random.randn(3), random.random(), random.gauss(0, 1))
            assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
            assert draws[2:] == expected_draws[2:]
            assert [_advance(fresh, step) for step in (6, 7)] == expected_next
        finally:
            fresh.comm.abort()
            del store2
    finally:
        w.comm.abort()
        del store


def test_the_gradient_coding_drivers_results_in_flight_load_weights_only(tmp_path):
    cfg = GradientCodingConfig(scheme="m_sgc", window=3, streams=3)
    driver = CodedDriver(cfg, 4)
    vector = np.linspace(-1, 1, 7)  # what a worker's coded answer is: a float64 array
    driver.results = {(2, Task(job=4, kind="row")): vector, (1, Task(job=5, kind="d1", index=1)): vector[:3]}
    path = checkpoint.save(tmp_path, 1, {"driver": {"strategy": driver.state_dict()}}, {}, keep=1)

    restored = CodedDriver(cfg, 4)
    restored.load_state_dict(torch.load(path / "driver.pt", weights_only=True)["strategy"])
    assert restored.results.keys() == driver.results.keys()
    for key, value in driver.results.items():
        assert isinstance(restored.results[key], np.ndarray) and restored.results[key].dtype == np.float64
        assert np.array_equal(restored.results[key], value)


def test_a_failed_resave_of_a_step_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 5, value=1.0)
    rename = checkpoint.os.rename

    def fail_on_landing(src, dst):
        if Path(src).name.startswith(checkpoint.TMP):
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", fail_on_landing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 5, value=2.0)
    path, meta = checkpoint.latest(tmp_path)
    assert meta["step"] == 5 and checkpoint.load_part(path, "replica")["w"][0].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]


# A save in a child process that dies (os._exit: no cleanup runs) at a chosen point.
CRASHING_SAVE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    from raylane.orchestrator import checkpoint

    root, where = Path(sys.argv[1]), sys.argv[2]
    if where == "mid_write":
        written = []
        real_write = checkpoint._write
        def write(path, data):
            real_write(path, data)
            written.append(path)
            if len(written) == 2:
                os._exit(9)
        checkpoint._write = write
    else:  # between moving the old step aside and renaming the new one in
        real_rename = os.rename
        def rename(src, dst):
            if Path(src).name.startswith(checkpoint.TMP):
                os._exit(9)
            real_rename(src, dst)
        checkpoint.os.rename = rename
    parts = {"driver": {"step": 5}, "replica": {"w": torch.full((4,), 2.0)}, "local_0": {"n": 5}}
    checkpoint.save(root, 5, parts, {"config": {}}, keep=3)  # the config is never read: it dies first
""")


@pytest.mark.parametrize("where", ["mid_write", "between_renames"])
def test_a_save_killed_midway_leaves_a_loadable_checkpoint_and_the_next_start_cleans_up(tmp_path, where):
    cfg = small_cfg(tmp_path, "run.name=crashy")
    run_dir = cfg.run.path()
    _save(run_dir / "checkpoints", 4, value=4.0, config=cfg.to_dict())
    _save(run_dir / "checkpoints", 5, value=1.0, config=cfg.to_dict())
    (run_dir / "config.yaml").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(run_dir / "checkpoints"), where], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers, "the crash should have left a temp folder behind"

    assert prepare_run_dir(small_cfg(tmp_path, "run.name=crashy", "resume=true")) == run_dir  # the next start
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]
    path, meta = checkpoint.latest(run_dir / "checkpoints")
    assert meta["step"] == 5 and checkpoint.load_part(path, "replica")["w"][0].item() == 1.0



SAMPLES = [None, True, 3, 2**70, 1.5, float("nan"), 1j, "s", b"b", bytearray(b"a"), torch.Size([2]), torch.float16,
           torch.device("cpu"), torch.ones(2, dtype=torch.bfloat16), torch.nn.Parameter(torch.ones(1)), {1, 2},
           collections.OrderedDict(a=1), [1, (2, "x")], {(1, "row", 0): 2.0},
           np.zeros(2), np.float64(1.0), np.int64(3), frozenset({1}), slice(1, 2), range(3),
           collections.defaultdict(int), Task(job=1, kind="row")]


def test_what_save_accepts_is_what_the_weights_only_loader_accepts(tmp_path):
    for i, value in enumerate(SAMPLES):
        try:
            checkpoint.check_plain({"x": value}, "part")
            accepted = True
        except checkpoint.CheckpointError:
            accepted = False
        torch.save({"x": value}, tmp_path / f"{i}.pt")
        try:
            torch.load(tmp_path / f"{i}.pt", weights_only=True)
            loads = True
        except pickle.UnpicklingError:
            loads = False
        assert accepted == loads, f"save {'accepts' if accepted else 'refuses'} {value!r}, the loader does not"


def test_a_part_holding_anything_else_is_refused_at_save_naming_where(tmp_path):
    _save(tmp_path, 1)
    parts = {"driver": {"strategy": {"results": {(0, 4, "row", 0): np.zeros(3)}}}}
    with pytest.raises(checkpoint.CheckpointError, match=r"^driver\['strategy'\]\['results'\]\[\(0, 4, 'row', 0\)\]: "
                                                         r"a numpy.ndarray is not a tensor or plain type"):
        checkpoint.save(tmp_path, 2, parts, {}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
