"""Shared fixtures: one local Ray cluster per test session (on loopback), small configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")

import benchmarks._spawn  # noqa: E402

benchmarks._spawn.REUSE = True  # warm spawned ranks across tests (benchmarks spawn fresh ones)

SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.batch_size=4", "data.seq_len=32",
         "data.eval_batches=4", "logging=quiet", "train.eval_every=0", "checkpoint.every=0"]


def small_cfg(tmp_path, *overrides: str):
    """A validated RunConfig for a tiny char-LM run in tmp_path."""
    from raylane import config

    return config.load([*SMALL, f"run.root={tmp_path}", *overrides])


@pytest.fixture
def no_ray(monkeypatch):
    """Any ray.init fails the test: bad input must be caught before Ray is touched."""
    import ray

    def refuse(*a, **k):
        raise AssertionError("ray.init called for bad input")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raylane.train import start_local_ray

    start_local_ray(num_cpus=4)
    yield ray
    ray.shutdown()


FAULT_FREE = ["train.steps=12", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5"]


@pytest.fixture(scope="session")
def fault_free_run(ray_cluster, tmp_path_factory):
    """One fault-free run of FAULT_FREE, the reference of the fault tests in test_faults.py and
    test_faults_e2e.py (each runs its faults on the same training config): (its config, the
    coordinator after it, every worker's flat parameters)."""
    cfg = small_cfg(tmp_path_factory.mktemp("ff"), *FAULT_FREE, "run.name=fault-free")
    return (cfg, *train_and_collect(cfg))


def train_and_collect(cfg, method: str = "flat_parameters", *more: str):
    """Run a Coordinator on `cfg` to its last step; (coordinator, every worker's `method()`, then every
    worker's result of each of `more`, called in that order), its actors stopped."""
    from raylane.orchestrator.coordinator import Coordinator

    coord = Coordinator(cfg)
    try:
        coord.train()
        return coord, *(coord.group.get(coord.group.call(m)) for m in (method, *more))
    finally:
        coord.close()
