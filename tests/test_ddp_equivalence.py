"""ddp on 4 Gloo worker actors equals one process training on the 4 shards' batches concatenated."""

import pytest
import torch

from raylane.comm import connect, host_store
from raylane.workers.optim import lr_at
from raylane.workers.worker import TrainWorker
from tests.conftest import small_cfg, train_and_collect

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]

STEPS = 20


def single_process_reference(cfg, world: int) -> torch.Tensor:
    """One process, batch = world x per-worker batch: the concatenation of the shards' batches."""
    ref_cfg = small_cfg_like(cfg, batch_size=cfg.data.batch_size * world)
    worker = TrainWorker(ref_cfg, rank=0)
    store = host_store("127.0.0.1")
    worker.connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    for step in range(1, STEPS + 1):
        worker.train_step((step - 1) * ref_cfg.data.batch_size, lr_at(step, cfg.train.steps, cfg.optim))
    return worker.flat_parameters()


def small_cfg_like(cfg, batch_size: int):
    import copy

    out = copy.deepcopy(cfg)
    out.data.batch_size = batch_size
    out.cluster.num_workers = 1
    return out


def test_ddp_on_4_workers_equals_single_process_on_concatenated_batches(ray_cluster, tmp_path):
    cfg = small_cfg(tmp_path, f"train.steps={STEPS}", "cluster.num_workers=4", "optim.warmup_steps=5")
    _, params = train_and_collect(cfg)
    for p in params[1:]:
        assert torch.equal(p, params[0]), "replicas diverged"
    reference = single_process_reference(cfg, 4)
    initial = TrainWorker(cfg, rank=0).model
    moved = (params[0] - torch.cat([p.detach().reshape(-1) for p in initial.parameters()])).abs().max()
    assert moved > 1e-3, "training did not change the parameters"
    diff = (params[0] - reference).abs().max().item()
    print(f"max abs diff ddp vs single process: {diff:.2e}")
    assert diff <= 1e-5
