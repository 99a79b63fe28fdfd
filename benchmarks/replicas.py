"""Claim: multi-rank replicas keep the heavy traffic inside a replica and shard its memory.

2 replicas x 2 ranks (4 Gloo processes, real TrainWorkers without Ray: benchmarks/_replica_procs.py),
a char-transformer LM, AdamW, the same data and seed for every system:
- hsdp with engine=torch (inner ddp) and with DeepSpeed ZeRO-0/1/2/3 inside each replica;
- replica_diloco (DeepSpeed ZeRO-1 inside, H = 8) with fp32 and with int8 outer gradients.
Per system: bytes per step inside a replica (raylane's inner Communicator + DeepSpeed's own
collectives, estimated from DeepSpeed's comms logger: replica_deepspeed.py) and across replicas (the
outer Communicator), summed over the 4 ranks; optimizer state per rank (the optimizer's state tensors)
and DeepSpeed's fp32 master partition; peak RSS per rank; step time (the slowest rank's, median over
the steps after the first 2). Systems are interleaved, each repeated REPS times: median (min, max).

Claims (computed from the rows):
- diloco, outer vs inner bytes: inner / outer >= H x (32 / outer bits);
- ZeRO-k optimizer state per rank / ZeRO-0's ~ 1 / ranks_per_replica (k = 1, 2, 3);
- step time of DeepSpeed ZeRO-1 vs engine=torch (<= 2x on this CPU box: DeepSpeed adds Python-side work).

    python benchmarks/replicas.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import claim, median, write  # noqa: E402

R, WORKERS, H = 2, 4, 8
BASE = ["logging=quiet", "train.eval_every=0", "checkpoint.every=0", "optim.schedule=constant",
        f"cluster.num_workers={WORKERS}", f"cluster.ranks_per_replica={R}", "data.seq_len=64", "data.batch_size=8"]
MODEL = {"full": ["model.n_layer=2", "model.d_model=128", "model.n_head=4"],
         "quick": ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]}
DS = ["strategy.engine=deepspeed"]
SYSTEMS = {
    "hsdp torch": ["strategy=hsdp"],
    **{f"hsdp zero{z}": ["strategy=hsdp", *DS, f"strategy.zero_stage={z}"] for z in range(4)},
    "diloco zero1 fp32": ["strategy=replica_diloco", *DS, "strategy.zero_stage=1", f"strategy.sync_every={H}"],
    "diloco zero1 int8": ["strategy=replica_diloco", *DS, "strategy.zero_stage=1", f"strategy.sync_every={H}",
                          "strategy.compression.name=int", "strategy.compression.bits=8"],
}
OUTER_BITS = {"diloco zero1 fp32": 32, "diloco zero1 int8": 8}


def _cfg(system: str, steps: int, size: str, root: str):
    from raylane import config

    return config.load([*BASE, *MODEL[size], f"train.steps={steps}", f"run.root={root}", *SYSTEMS[system]])


def measure(system: str, steps: int, size: str, root: str) -> dict[str, float]:
    """One run of `system`: per-step bytes (summed over ranks), memory per rank, step time."""
    from benchmarks._replica_procs import train_ranks

    results = train_ranks(_cfg(system, steps, size, root), steps, timeout_s=600)
    per_step = list(zip(*[r["steps"] for r in results]))  # step -> the ranks' metrics
    inner = sum(m["group_bytes_sent"].get("inner", 0) + m["deepspeed/bytes_sent"] for ms in per_step for m in ms)
    outer = sum(m["group_bytes_sent"].get("outer", 0) for ms in per_step for m in ms)
    times = sorted(max(m["step_time_s"] for m in ms) for ms in per_step[2:])
    last = [r["metrics"] for r in results]
    return {"inner_bytes_per_step": inner / steps, "outer_bytes_per_step": outer / steps,
            "optimizer_state_bytes_per_rank": max(m["engine/optimizer_state_bytes"] for m in last),
            "master_bytes_per_rank": max(m["engine/master_bytes"] for m in last),
            "peak_rss_mb_per_rank": max(m["engine/peak_rss_bytes"] for m in last) / 2**20,
            "step_time_s": median(times), "final_loss": sum(r["losses"][-1] for r in results) / len(results)}


def summarize(system: str, reps: list[dict]) -> dict:
    row = {"system": system, "reps": len(reps)}
    for key in reps[0]:
        xs = [r[key] for r in reps]
        row[key] = median(xs)
        if key in ("step_time_s", "peak_rss_mb_per_rank"):
            row[f"{key}_min"], row[f"{key}_max"] = min(xs), max(xs)
    return row


def claims_for(rows: list[dict]) -> list[dict]:
    by = {r["system"]: r for r in rows}
    out = []
    for system, bits in OUTER_BITS.items():
        ratio = by[system]["inner_bytes_per_step"] / by[system]["outer_bytes_per_step"]
        goal = H * 32 / bits
        out.append(claim(f"{system}: inner / outer bytes per step", ratio, f">= {goal:g} (H x 32/bits)",
                         ratio >= goal))
    base = by["hsdp zero0"]["optimizer_state_bytes_per_rank"]
    for z in (1, 2, 3):
        ratio = by[f"hsdp zero{z}"]["optimizer_state_bytes_per_rank"] / base
        out.append(claim(f"ZeRO-{z} optimizer state per rank / ZeRO-0's", ratio, f"~ 1/{R} (within 5%)",
                         abs(ratio - 1 / R) <= 0.05 / R))
    ratio = by["hsdp zero1"]["step_time_s"] / by["hsdp torch"]["step_time_s"]
    out.append(claim("step time DeepSpeed ZeRO-1 / engine=torch", ratio, "<= 2", ratio <= 2))
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    args = ap.parse_args(argv)
    steps, reps, size = (H, 1, "quick") if args.quick else (2 * H, 3, "full")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(reps):  # interleaved: every system once per repetition
            for system in SYSTEMS:
                runs[system].append(measure(system, steps, size, root))
                print(system, runs[system][-1], flush=True)
    rows = [summarize(s, r) for s, r in runs.items()]
    notes = (f"load average before {', '.join(f'{x:.1f}' for x in load_before)}, after "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}. {WORKERS} ranks = {WORKERS // R} replicas x {R}, "
             f"{steps} steps per run, {reps} interleaved repetitions: median (min, max). Inner bytes include "
             "DeepSpeed's own collectives, estimated from its comms logger's message sizes with ring formulas. "
             "optimizer_state_bytes: the optimizer's state tensors (AdamW moments) on a rank; master_bytes: "
             "DeepSpeed's fp32 master partition, which ZeRO >= 1 keeps even for an fp32 model (on GPUs with "
             "bf16 weights it is the fp32 copy mixed precision needs anyway). peak RSS is the whole process.")
    return write("replicas_quick" if args.quick else "replicas", rows, claims_for(rows), notes)


if __name__ == "__main__":
    print(main())
