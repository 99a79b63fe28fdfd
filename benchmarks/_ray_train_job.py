"""The startup benchmark's baseline: raylane's default job (same model, data, batch, workers) under
Ray Train's TorchTrainer. Writes `time.time()` to $STARTUP_MARK when rank 0 finishes its first step.

    python benchmarks/_ray_train_job.py MARK_FILE [raylane overrides ...]
"""

from __future__ import annotations

import os
import sys
import time


def train_loop(config: dict) -> None:
    import torch
    import ray.train as rt
    from ray.train.torch import prepare_model

    from raylane.workers.data import GlobalSampler, build_dataset
    from raylane.workers.models import build_model, loss_fn
    from raylane.workers.optim import build_optimizer

    cfg = config["cfg"]
    torch.set_num_threads(1)
    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = build_dataset(cfg.data, cfg.seed)
    sampler = GlobalSampler(data.num_train, cfg.seed)
    model = prepare_model(build_model(cfg.model, data.vocab_size, data.input_dim, cfg.data.seq_len, cfg.seed))
    opt = build_optimizer(model.parameters(), cfg.optim)
    bs = cfg.data.batch_size
    for step in range(cfg.train.steps):
        x, y = data.train_batch(sampler.indices(step * world * bs + rank * bs, bs))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if step == 0 and rank == 0:
            with open(config["mark"], "w") as f:
                f.write(repr(time.time()))


def main() -> None:
    mark, overrides = sys.argv[1], sys.argv[2:]
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylane import config

    cfg = config.load(overrides)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False,
             _node_ip_address="127.0.0.1")
    trainer = TorchTrainer(train_loop, train_loop_config={"cfg": cfg, "mark": mark},
                           scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers,
                                                        resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
                           run_config=RunConfig(storage_path=str(cfg.run.path()) + "-raytrain", name="startup"))
    trainer.fit()
    ray.shutdown()


if __name__ == "__main__":
    main()
