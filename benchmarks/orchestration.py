"""Claim: raylane's ddp costs no more per step than Ray Train's TorchTrainer or plain torch DDP.

One run, same model (the default char transformer), same per-worker batch, same data,
4 workers of 0.5 CPU each on one local Ray cluster (plain DDP: 4 spawned processes):
1. raylane ddp (Coordinator, Gloo, bucketed allreduce overlapped with backward);
2. Ray Train TorchTrainer with torch DDP (Gloo);
3. plain torch DDP: torch.multiprocessing + init_process_group("gloo").
Time per step is the median over the steps after a warm-up, as each system's driver or
rank 0 sees it. Writes benchmarks/results/orchestration.{json,md}.

    python benchmarks/orchestration.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import claim, median, train_and_read, write  # noqa: E402

WORKERS = 4


def _cfg(steps: int, root: str):
    from raylane import config

    return config.load([f"train.steps={steps}", "logging=quiet", "train.eval_every=0", "checkpoint.every=0",
                        f"cluster.num_workers={WORKERS}", f"run.root={root}", "run.name=bench-raylane"])


def _setup_ddp(cfg, rank: int, world: int):
    """torch DDP on the same model, data, optimizer and clipping as raylane: (model, opt, step_fn)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from raylane.workers.data import GlobalSampler, build_dataset
    from raylane.workers.models import build_model, loss_fn
    from raylane.workers.optim import build_optimizer, lr_at

    torch.set_num_threads(1)
    data = build_dataset(cfg.data, cfg.seed)
    sampler = GlobalSampler(data.num_train, cfg.seed)
    model = DDP(build_model(cfg.model, data.vocab_size, data.input_dim, cfg.data.seq_len, cfg.seed))
    opt = build_optimizer(model.parameters(), cfg.optim)
    bs = cfg.data.batch_size

    def step_fn(step: int) -> float:
        x, y = data.train_batch(sampler.indices((step - 1) * bs * world + rank * bs, bs))
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train.steps, cfg.optim)
        opt.step()
        return loss.item()
    return model, opt, step_fn


def _torch_loop(cfg, rank: int, world: int, steps: int) -> list[float]:
    """The loop Ray Train and plain DDP run; per-step wall times."""
    import torch.distributed as dist

    _, _, step_fn = _setup_ddp(cfg, rank, world)
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        step_fn(step)
        times.append(time.perf_counter() - t0)
    dist.barrier()
    return times


def run_raylane(cfg, steps: int, warmup: int) -> dict:
    summary, lines = train_and_read(cfg)
    rounds = [x["train/round_s"] for x in lines if "train/round_s" in x][warmup:]
    return {"system": "raylane ddp", "step_s": median(rounds), "final_train_loss": summary.train_loss}


def _ray_train_loop(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    times = _torch_loop(config["cfg"], ctx.get_world_rank(), ctx.get_world_size(), config["steps"])
    if ctx.get_world_rank() == 0:
        Path(config["out"]).write_text(",".join(map(str, times)))
    del dist


def run_ray_train(cfg, steps: int, warmup: int, tmp: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = os.path.join(tmp, "ray_train_times.txt")
    trainer = TorchTrainer(_ray_train_loop, train_loop_config={"cfg": cfg, "steps": steps, "out": out},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False,
                                                        resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
                           run_config=RunConfig(storage_path=tmp, name="bench-ray-train"))
    trainer.fit()
    times = [float(t) for t in Path(out).read_text().split(",")][warmup:]
    return {"system": "ray train TorchTrainer + DDP", "step_s": median(times)}


def _plain_ddp_entry(rank: int, cfg, steps: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    times = _torch_loop(cfg, rank, WORKERS, steps)
    if rank == 0:
        Path(out).write_text(",".join(map(str, times)))
    dist.destroy_process_group()


def run_plain_ddp(cfg, steps: int, warmup: int, tmp: str) -> dict:
    import torch.multiprocessing as mp

    from raylane.comm.process_group import free_port

    out = os.path.join(tmp, "plain_ddp_times.txt")
    mp.spawn(_plain_ddp_entry, args=(cfg, steps, free_port(), out), nprocs=WORKERS, join=True)
    times = [float(t) for t in Path(out).read_text().split(",")][warmup:]
    return {"system": "plain torch DDP (mp + gloo)", "step_s": median(times)}


def main() -> None:
    import ray

    from raylane.train import start_local_ray

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="few steps, to check the script works")
    args = p.parse_args()
    steps, warmup = (12, 4) if args.quick else (120, 20)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(steps, tmp)
        start_local_ray(os.cpu_count() or 2)
        try:
            rows = [run_raylane(cfg, steps, warmup), run_ray_train(cfg, steps, warmup, tmp)]
        finally:
            ray.shutdown()
        rows.append(run_plain_ddp(cfg, steps, warmup, tmp))
    base = {r["system"]: r["step_s"] for r in rows}
    ours = base["raylane ddp"]
    vs_train = ours / base["ray train TorchTrainer + DDP"]
    vs_ddp = ours / base["plain torch DDP (mp + gloo)"]
    claims = [claim("raylane step time / Ray Train step time", vs_train, "<= 1.0", vs_train <= 1.0),
              claim("raylane step time / plain torch DDP step time", vs_ddp, "<= 1.1", vs_ddp <= 1.1)]
    notes = (f"{WORKERS} workers x 0.5 CPU, batch {cfg.data.batch_size}x{cfg.data.seq_len} chars per worker, "
             f"{steps} steps, median after {warmup} warm-up steps.")
    print(write("orchestration", rows, claims, notes).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
