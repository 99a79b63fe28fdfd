"""Claim: raylane recovers from a worker crash faster than Ray Train, and loses no steps.

One run, same model, data and 4 workers (0.5 CPU each) on one local Ray cluster, both
checkpointing every 10 steps; worker 1's process dies (os._exit) during step 25:
1. raylane ddp: recovery in place (replacement actor, new process-group generation,
   state from a live peer);
2. Ray Train TorchTrainer + DDP with FailureConfig(max_failures=1): the worker group is
   restarted and resumes from the last reported checkpoint.
Both systems are measured the same way, from what each logged per completed step (raylane:
metrics.jsonl; Ray Train: rank 0's step log): time to recover = (first completion of the crash
step) - (first completion of the step before it) - (median step time before the crash); steps
lost = steps logged as completed more than once (done before the crash, done again after it).
Writes benchmarks/results/recovery.{json,md}.

    python benchmarks/recovery.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import claim, median, write  # noqa: E402
from benchmarks.orchestration import WORKERS  # noqa: E402

CRASH_STEP, CKPT_EVERY, CRASH_RANK = 25, 10, 1


def _recovery(times: dict[int, float], crash_step: int) -> float:
    steady = median([times[s] - times[s - 1] for s in range(2, crash_step) if s in times and s - 1 in times])
    return times[crash_step] - times[crash_step - 1] - steady


def measured(completions: list[tuple[int, float]], crash_step: int, superseded: int = 0) -> dict:
    """Recovery time, steps lost and steps done from a system's log of (step, time) completions,
    in the order they were logged: the one measure for every system. `superseded`: completions
    the log recorded and then dropped (raylane rewrites metrics.jsonl when it goes back to a
    checkpoint and logs how many rows it dropped); each is a step done twice."""
    first: dict[int, float] = {}
    count: dict[int, int] = {}
    for step, t in completions:
        first.setdefault(step, t)
        count[step] = count.get(step, 0) + 1
    return {"recovery_s": _recovery(first, crash_step),
            "steps_lost": superseded + sum(c - 1 for c in count.values()), "steps_done": max(first)}


def raylane_log(lines: list[dict]) -> tuple[list[tuple[int, float]], int]:
    """(step, time) of each train row of a raylane metrics.jsonl, and the rows it superseded."""
    superseded = sum(x.get("steps_redone", 0) for x in lines if x.get("event") in ("rewound", "resumed"))
    return [(x["step"], x["time_s"]) for x in lines if "train/loss" in x], superseded


def run_raylane(steps: int, root: str) -> dict:
    from raylane import config
    from raylane.orchestrator.coordinator import Coordinator

    cfg = config.load([f"train.steps={steps}", "logging=quiet", "train.eval_every=0",
                       f"checkpoint.every={CKPT_EVERY}", f"cluster.num_workers={WORKERS}", f"run.root={root}",
                       "run.name=bench-recovery", "cluster.collective_timeout_s=10",
                       f"+faults.events=[{{kind: crash, rank: {CRASH_RANK}, step: {CRASH_STEP}, mode: exit}}]"])
    coord = Coordinator(cfg)
    try:
        coord.train()
    finally:
        coord.close()
    lines = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    completions, superseded = raylane_log(lines)
    return {"system": "raylane (in place, live peer)", **measured(completions, CRASH_STEP, superseded)}


def _ray_train_loop(config: dict) -> None:
    import ray.train
    import torch

    from benchmarks.orchestration import _setup_ddp

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, log_path, marker = config["cfg"], Path(config["log"]), Path(config["marker"])
    model, opt, step_fn = _setup_ddp(cfg, rank, world)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    for step in range(start + 1, config["steps"] + 1):
        if rank == CRASH_RANK and step == CRASH_STEP and not marker.exists():
            marker.write_text("crashed")
            os._exit(1)
        step_fn(step)
        metrics = {"step": step}
        if step % CKPT_EVERY == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step},
                               Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "t": time.time()}) + "\n")


def run_ray_train(cfg, steps: int, tmp: str) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    log, marker = os.path.join(tmp, "ray_train_steps.jsonl"), os.path.join(tmp, "crashed")
    trainer = TorchTrainer(_ray_train_loop,
                           train_loop_config={"cfg": cfg, "steps": steps, "log": log, "marker": marker},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False,
                                                        resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
                           run_config=RunConfig(storage_path=tmp, name="bench-recovery-ray-train",
                                                failure_config=FailureConfig(max_failures=1)))
    trainer.fit()
    records = [json.loads(x) for x in Path(log).read_text().splitlines()]
    return {"system": "ray train TorchTrainer, FailureConfig(max_failures=1)",
            **measured([(r["step"], r["t"]) for r in records], CRASH_STEP)}


def main() -> None:
    import ray

    from raylane import config
    from raylane.train import start_local_ray

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    steps = 32 if args.quick else 60
    with tempfile.TemporaryDirectory() as tmp:
        start_local_ray(os.cpu_count() or 2)
        try:
            cfg = config.load([f"train.steps={steps}", f"cluster.num_workers={WORKERS}", "logging=quiet"])
            rows = [run_raylane(steps, tmp), run_ray_train(cfg, steps, tmp)]
        finally:
            ray.shutdown()
    print(write("recovery", rows, claims_for(rows), notes(steps)).with_suffix(".md").read_text())


def claims_for(rows: list[dict]) -> list[dict]:
    """Claims from the rows, both systems' steps lost counted alike (steps_lost of `measured`)."""
    ours, theirs = rows[0], rows[1]
    ratio = theirs["recovery_s"] / max(ours["recovery_s"], 1e-9)
    since_ckpt = (CRASH_STEP - 1) % CKPT_EVERY  # steps done after the last checkpoint before the crash
    return [claim("Ray Train recovery time / raylane recovery time", ratio, ">= 1.0", ratio >= 1.0),
            claim("raylane steps lost", ours["steps_lost"], "== 0", ours["steps_lost"] == 0),
            claim("Ray Train steps lost", theirs["steps_lost"],
                  f"== {since_ckpt} (the steps since its last checkpoint)", theirs["steps_lost"] == since_ckpt),
            claim("raylane steps lost <= Ray Train steps lost", theirs["steps_lost"] - ours["steps_lost"], ">= 0",
                  ours["steps_lost"] <= theirs["steps_lost"])]


def notes(steps: int) -> str:
    return (f"{WORKERS} workers x 0.5 CPU, char transformer, checkpoints every {CKPT_EVERY} steps, worker "
            f"{CRASH_RANK} dies at step {CRASH_STEP} of {steps}. Both systems measured from their own per-step "
            "logs: steps lost = steps logged as completed more than once.")


if __name__ == "__main__":
    main()
