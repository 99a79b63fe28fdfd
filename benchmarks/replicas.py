"""Claim: multi-rank replicas keep the heavy traffic inside a replica, and ZeRO-3 trains models bigger
than one rank's memory.

Traffic (2 replicas x 2 ranks: 4 Gloo processes, real TrainWorkers without Ray: _replica_procs.py), a
char-transformer LM, AdamW, the same data and seed for every system:
- hsdp with engine=torch (inner ddp) and with DeepSpeed ZeRO-0/1/2/3 inside each replica;
- replica_diloco (DeepSpeed ZeRO-1 inside, H = 8) with fp32 and with int8 outer gradients.
Per system: bytes per step inside a replica (raylane's inner Communicator, which also counts
DeepSpeed's own collectives as they are issued: replica_ds_comm.py) and across replicas (the outer
Communicator), summed over the 4 ranks; step time (the slowest rank's, median over the steps after
the first 2).

Memory (one replica of 2 ranks, hsdp, AdamW): per rank, the parameters it holds between steps
(ZeRO-3: its partitions), DeepSpeed's fp32 master partition and the optimizer state, from the live
tensors; and the growth of the process's peak RSS over training (from just before the model is
built: parameters, gradients, optimizer state, masters, gathered ZeRO-3 parameters, buffers).
ZeRO-3 builds the model under zero.Init and runs with the exposed limits (max_live_parameters,
prefetch_bucket_size, max_reuse_distance) and a small reduce bucket from the user's ds_config.
Cap sweep: the char LM at growing widths, engine=torch and ZeRO-3; the largest that trains with
every rank's peak RSS growth under CAP_MB.
Systems are interleaved, each repeated REPS times (the sweep once per size): median (min, max).

Claims (computed from the rows):
- diloco, outer vs inner bytes: inner / outer >= H x (32 / outer bits);
- ZeRO-k optimizer state per rank / ZeRO-0's ~ 1 / ranks_per_replica (k = 1, 2, 3);
- ZeRO-3 parameter + optimizer memory per rank (masters included) <= 0.6 x ZeRO-0's, fp32 and bf16;
- largest model under the per-rank cap, ZeRO-3 / engine=torch >= 1.8;
- step time of DeepSpeed ZeRO-1 vs engine=torch (<= 2x on this CPU box: DeepSpeed adds Python-side work).

    python benchmarks/replicas.py [--quick]
"""

from __future__ import annotations

import argparse
import json
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

# memory: one replica of 2 ranks; ZeRO-3 with the limits a DeepSpeed user sets to bound live memory
MEM_BASE = ["strategy=hsdp", "cluster.num_workers=2", f"cluster.ranks_per_replica={R}", "data.seq_len=32",
            "data.batch_size=2", "model.n_layer=2", "model.n_head=4"]
ZERO3 = [*DS, "strategy.zero_stage=3", "strategy.max_live_parameters=1000000",
         "strategy.prefetch_bucket_size=1000000", "strategy.max_reuse_distance=1000000",
         "strategy.ds_config={zero_optimization:{reduce_bucket_size:1000000}}"]
MEM_SYSTEMS = {"torch": [], "zero0": [*DS, "strategy.zero_stage=0"], "zero3": ZERO3,
               "zero0 bf16": None, "zero3 bf16": [*DS, "strategy.zero_stage=3", "strategy.max_live_parameters=1000000",
                                                   "strategy.prefetch_bucket_size=1000000",
                                                   "strategy.max_reuse_distance=1000000",
                                                   "strategy.ds_config={bf16:{enabled:true},zero_optimization:"
                                                   "{reduce_bucket_size:1000000}}"]}
MEM_SYSTEMS = {k: v for k, v in MEM_SYSTEMS.items() if v is not None}  # (ZeRO-0 takes no bf16: ds_config)
MEM_D = {"full": 512, "quick": 32}
SWEEP_D = {"full": [384, 512, 640, 768, 896, 1024], "quick": [32, 48]}
CAP_MB = {"full": 200.0, "quick": 400.0}


def _cfg(system: str, steps: int, size: str, root: str):
    from raylane import config

    return config.load([*BASE, *MODEL[size], f"train.steps={steps}", f"run.root={root}", *SYSTEMS[system]])


def measure(system: str, steps: int, size: str, root: str) -> dict[str, float]:
    """One run of `system`: per-step bytes (summed over ranks), memory per rank, step time."""
    from benchmarks._replica_procs import train_ranks

    results = train_ranks(_cfg(system, steps, size, root), steps, timeout_s=600)
    per_step = list(zip(*[r["steps"] for r in results]))  # step -> the ranks' metrics
    inner = sum(m["group_bytes_sent"].get("inner", 0) for ms in per_step for m in ms)  # DeepSpeed's included
    outer = sum(m["group_bytes_sent"].get("outer", 0) for ms in per_step for m in ms)
    times = sorted(max(m["step_time_s"] for m in ms) for ms in per_step[2:])
    last = [r["metrics"] for r in results]
    return {"inner_bytes_per_step": inner / steps, "outer_bytes_per_step": outer / steps,
            "optimizer_state_bytes_per_rank": max(m["engine/optimizer_state_bytes"] for m in last),
            "master_bytes_per_rank": max(m["engine/master_bytes"] for m in last),
            "peak_rss_mb_per_rank": max(m["engine/peak_rss_bytes"] for m in last) / 2**20,
            "step_time_s": median(times), "final_loss": sum(r["losses"][-1] for r in results) / len(results)}


def measure_memory(system: str, d_model: int, root: str, steps: int = 3) -> dict[str, float]:
    """One run of MEM_SYSTEMS[system] at width d_model: memory per rank (the larger of the 2 ranks)."""
    from raylane import config
    from benchmarks._replica_procs import train_ranks

    cfg = config.load([*BASE, *MEM_BASE, f"model.d_model={d_model}", f"train.steps={steps}", f"run.root={root}",
                       *MEM_SYSTEMS[system]])
    results = train_ranks(cfg, steps, timeout_s=600)
    last = [r["metrics"] for r in results]
    held = max(m["engine/param_bytes"] + m["engine/master_bytes"] + m["engine/optimizer_state_bytes"] for m in last)
    return {"params": int(results[0]["params"].size), "param_bytes_per_rank": max(m["engine/param_bytes"] for m in last),
            "master_bytes_per_rank": max(m["engine/master_bytes"] for m in last),
            "optimizer_state_bytes_per_rank": max(m["engine/optimizer_state_bytes"] for m in last),
            "param_and_optimizer_bytes_per_rank": held,
            "peak_growth_mb_per_rank": max(r["peak_growth_bytes"] for r in results) / 2**20,
            "final_loss": sum(r["losses"][-1] for r in results) / len(results)}


def summarize(system: str, reps: list[dict]) -> dict:
    row = {"system": system, "reps": len(reps)}
    for key in reps[0]:
        xs = [r[key] for r in reps]
        row[key] = median(xs)
        if key in ("step_time_s", "peak_rss_mb_per_rank", "peak_growth_mb_per_rank"):
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


def memory_claims(rows: list[dict], cap_mb: float) -> list[dict]:
    """ZeRO-3 vs ZeRO-0 memory per rank, and the largest model each engine trains under the cap."""
    by = {r["system"]: r for r in rows}
    out = []
    base = by["memory zero0"]["param_and_optimizer_bytes_per_rank"]
    for system in ("memory zero3", "memory zero3 bf16"):
        if system in by:
            ratio = by[system]["param_and_optimizer_bytes_per_rank"] / base
            out.append(claim(f"{system.split(' ', 1)[1]} parameter + optimizer memory per rank (masters included) / "
                             f"ZeRO-0's (fp32)", ratio, "<= 0.6", ratio <= 0.6))
    ratio = by["memory zero3"]["peak_growth_mb_per_rank"] / by["memory zero0"]["peak_growth_mb_per_rank"]
    out.append(claim("zero3 peak RSS growth per rank / ZeRO-0's (fp32)", ratio, "<= 0.6", ratio <= 0.6))
    largest = {}
    for engine in ("torch", "zero3"):
        fits = [r["params"] for r in rows if r["system"].startswith(f"sweep {engine} ")
                and r["peak_growth_mb_per_rank"] <= cap_mb]
        largest[engine] = max(fits, default=0)
    ratio = largest["zero3"] / max(largest["torch"], 1)
    out.append(claim(f"largest model trained under {cap_mb:g} MB peak RSS growth per rank: ZeRO-3 / engine=torch "
                     f"({largest['zero3']:,} / {largest['torch']:,} parameters)", ratio, ">= 1.8",
                     ratio >= 1.8 and largest["torch"] > 0))
    return out


def run_traffic(steps: int, reps: int, size: str, root: str) -> list[dict]:
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for _ in range(reps):  # interleaved: every system once per repetition
        for system in SYSTEMS:
            runs[system].append(measure(system, steps, size, root))
            print(system, runs[system][-1], flush=True)
    return [summarize(s, r) for s, r in runs.items()]


def run_memory(reps: int, size: str, root: str) -> list[dict]:
    mem: dict[str, list[dict]] = {s: [] for s in MEM_SYSTEMS}
    for _ in range(reps):
        for system in MEM_SYSTEMS:
            mem[system].append(measure_memory(system, MEM_D[size], root))
            print("memory", system, mem[system][-1], flush=True)
    sweep = []
    for d in SWEEP_D[size]:  # once per size; engines interleaved
        for engine in ("torch", "zero3"):
            sweep.append({"system": f"sweep {engine} d{d}", "reps": 1, **measure_memory(engine, d, root, steps=2)})
            print(sweep[-1], flush=True)
    return [summarize(f"memory {s}", r) for s, r in mem.items()] + sweep


def _kept_rows(name: str, part: str) -> tuple[list[dict], str]:
    """With --part, the other part's rows from the last results file (and its notes)."""
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    if part == "all" or not path.is_file():
        return [], ""
    old = json.loads(path.read_text())
    memory = part == "traffic"  # keep the memory rows when re-running traffic, and vice versa
    rows = [r for r in old["rows"] if r["system"].startswith(("memory ", "sweep ")) == memory]
    return rows, f" ({'memory' if memory else 'traffic'} rows kept from the previous run: {old.get('notes', '')[:160]}...)"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--part", choices=("all", "traffic", "memory"), default="all",
                    help="run one part; the other part's rows are kept from the last results file")
    args = ap.parse_args(argv)
    # every tensor of 64 KiB or more in its own mapping, returned when freed (glibc otherwise raises its mmap
    # threshold after the first big free and keeps freed heap): the rank processes' RSS tracks live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    steps, reps, size = (H, 1, "quick") if args.quick else (2 * H, 3, "full")
    name = "replicas_quick" if args.quick else "replicas"
    load_before = os.getloadavg()
    kept, kept_note = _kept_rows(name, args.part)
    with tempfile.TemporaryDirectory() as root:
        rows = run_traffic(steps, reps, size, root) if args.part in ("all", "traffic") else []
        rows += run_memory(reps, size, root) if args.part in ("all", "memory") else []
    rows += kept
    traffic = [r for r in rows if not r["system"].startswith(("memory ", "sweep "))]
    memory = [r for r in rows if r["system"].startswith(("memory ", "sweep "))]
    notes = (f"load average before {', '.join(f'{x:.1f}' for x in load_before)}, after "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}. Traffic rows: {WORKERS} ranks = {WORKERS // R} "
             f"replicas x {R}, {steps} steps per run, {reps} interleaved repetitions: median (min, max). Inner bytes "
             "include DeepSpeed's own collectives, counted as issued with raylane.comm.wire's Gloo byte model "
             "(checked against socket bytes within 1% in tests/test_replicas.py). "
             "optimizer_state_bytes: the optimizer's state tensors (AdamW moments) on a rank; master_bytes: "
             "DeepSpeed's fp32 master partition, which ZeRO >= 1 keeps even for an fp32 model (on GPUs with "
             "bf16 weights it is the fp32 copy mixed precision needs anyway). peak RSS is the whole process. "
             f"Memory rows: one replica of {R} ranks (hsdp), d_model={MEM_D[size]}, AdamW, 3 steps, {reps} "
             "interleaved repetitions; param_and_optimizer_bytes = the parameters a rank holds between steps "
             "(ZeRO-3: its partitions) + DeepSpeed's fp32 master partition + the optimizer state, from the live "
             "tensors; peak_growth_mb = growth of the process's peak RSS from just before the model is built "
             "(DeepSpeed imported) to the end of training, with MALLOC_MMAP_THRESHOLD_=65536 so that freed "
             "tensors leave the RSS. Sweep rows: 2 steps at each width, once each; cap "
             f"{CAP_MB[size]:g} MB of peak RSS growth per rank." + kept_note)
    claims = (claims_for(traffic) if traffic else []) + (memory_claims(memory, CAP_MB[size]) if memory else [])
    return write(name, traffic + memory, claims, notes)


if __name__ == "__main__":
    print(main())
