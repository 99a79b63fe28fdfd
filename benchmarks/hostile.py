"""Claim: one composed config survives a hostile world that breaks plain Streaming DiLoCo and slows ddp.

One job per system on the local CPU Ray cluster, 8 workers (replicas), the char LM, the same tokens:
- ddp: bucketed fp32 gradient all-reduce every step;
- streaming: Streaming DiLoCo (P = 2 strided fragments, fp4 e3m0 outer gradients), mean outer sync (the
  all-reduce; under attack the mean rule over gathered rows, `strategy.outer.aggregator=mean`, which is
  what lets replica 7 forge its row: the same mean, one quantization instead of the all-reduce's two);
- composed: the same, plus a robust outer sync (`strategy.outer.aggregator`, trimmed mean with f = 1),
  L-GreCo's per-tensor outer compression (`strategy.outer.compression=lgreco`, fp4's error budget) and
  peer-replica recovery (`strategy.recover_from=peer_replica`).
Each runs fault-free and under all faults at once: every link 100 Mbit/s + 1 ms per message (emulated),
the SGC authors' AWS Lambda delays replayed per worker (../shared/data/stragglers, 256-worker trace,
load 0), worker 3 crashing between two outer syncs, and replica 7 Byzantine from the first step,
forging its outer gradient with ALIE (z from n and f as the paper defines) and, in a separate run, the
adaptive ALIE (z searched each sync against the run's own rule). ddp exchanges no outer gradient: its
faulty runs get the links, the stragglers and the crash (the Byzantine modes need a gathered row).
Seeds are paired (the same seed for every system); systems are interleaved per seed.

Writes benchmarks/results/hostile.{json,md,png}. Runs are kept in results/hostile_runs.json with the
settings they ran under, so seeds can be added one invocation at a time (`--first-seed 1 --seeds 1`)
and the tables cover every stored seed of the same settings:
    python benchmarks/hostile.py [--seeds 3] [--first-seed 0] [--steps 200] [--h 50] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, claim, median, train_and_read, write  # noqa: E402

WORKERS, CRASH_RANK, BYZANTINE_RANK = 8, 3, 7
TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "stragglers" / "lambda-canada-w256-load0000.csv"
SYSTEMS = {
    "ddp": ["strategy=ddp"],
    "streaming": ["strategy=streaming_diloco", "strategy.overlap_steps=0"],
    "composed": ["strategy=streaming_diloco", "strategy.overlap_steps=0", "strategy.outer.aggregator=trimmed_mean",
                 "strategy.outer.f=1", "strategy.outer.compression=lgreco", "strategy.recover_from=peer_replica"],
}
ATTACKS = ("alie", "alie_opt")


def fault_events(steps: int, attack: str | None, crash_at: int) -> str:
    events = ["{kind:network,bandwidth_gbps:0.1,latency_s:0.001}",
              f"{{kind:straggler,straggler:{{model:trace,trace:'{TRACE}',scale:0.05}}}}",
              f"{{kind:crash,rank:{CRASH_RANK},step:{crash_at},mode:exit}}"]
    if attack:
        events.append(f"{{kind:byzantine,rank:{BYZANTINE_RANK},step:1,until:{steps + 1},mode:{attack}}}")
    return "faults.events=[" + ",".join(events) + "]"


def common(steps: int, h: int, seed: int, root: str) -> list[str]:
    return [f"cluster.num_workers={WORKERS}", f"cluster.cpus_per_worker={2 / WORKERS}", "logging=quiet",
            f"train.steps={steps}", f"train.eval_every={max(1, steps // 4)}", "data.eval_batches=16",
            f"checkpoint.every={h}", "resume=false", f"seed={seed}", f"run.root={root}"]


def run_one(name: str, overrides: list[str]) -> dict:
    from raylane import config

    summary, lines = train_and_read(config.load(overrides))
    steps = [x for x in lines if "train/loss" in x]
    evals = [x for x in lines if "eval/loss" in x]
    eval_loss = evals[-1]["eval/loss"] if evals else float("nan")
    return {"system": name, "eval_loss": eval_loss, "diverged": not math.isfinite(eval_loss),
            "bytes_total": summary.bytes_sent_total, "wall_s": round(summary.wall_s, 2),
            "steps_redone": summary.faults.get("steps_redone", 0), "recovered": summary.faults.get("recovered", 0),
            "curve": [(x["time_s"], x["train/loss"]) for x in steps],
            "faults_at": [x["time_s"] for x in lines if x.get("event") in ("fault_detected", "recovered")]}


def plan(seeds: list[int]) -> list[tuple[int, str, str | None, bool]]:
    """(seed, system, attack, faulty), systems interleaved within each seed."""
    out = []
    for seed in seeds:
        for system in SYSTEMS:
            out.append((seed, system, None, False))
            for attack in ((None,) if system == "ddp" else ATTACKS):
                out.append((seed, system, attack, True))
    return out


def label(system: str, attack: str | None, faulty: bool) -> str:
    return system + (" (all faults" + (f", {attack})" if attack else ")") if faulty else " (fault-free)")


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    table = []
    for name, rs in groups.items():
        losses = [r["eval_loss"] if math.isfinite(r["eval_loss"]) else float("inf") for r in rs]
        table.append({"system": name, "seeds": len(rs), "eval_loss": median(losses), "eval_loss_min": min(losses),
                      "eval_loss_max": max(losses), "diverged": sum(r["diverged"] for r in rs),
                      "bytes": median([r["bytes_total"] for r in rs]), "wall_s": median([r["wall_s"] for r in rs]),
                      "steps_redone": max(r["steps_redone"] for r in rs)})
    by = {t["system"]: t for t in table}
    claims = []
    clean = by.get(label("streaming", None, False))
    comp = [by[k] for k in (label("composed", a, True) for a in ATTACKS) if k in by]
    if clean and comp:
        worst = max(c["eval_loss"] for c in comp)
        claims.append(claim("composed under all faults (worse attack): eval loss / fault-free streaming's - 1",
                            worst / clean["eval_loss"] - 1, "<= 0.05", worst <= 1.05 * clean["eval_loss"]))
    mean_runs = [by[k] for k in (label("streaming", a, True) for a in ATTACKS) if k in by]
    if clean and mean_runs:
        worst = max(m["eval_loss"] for m in mean_runs)
        claims.append(claim("mean-aggregated streaming under the stronger attack: eval loss / fault-free - 1 "
                            "(inf: diverged)", worst / clean["eval_loss"] - 1, ">= 0.20",
                            worst >= 1.2 * clean["eval_loss"]))
    ddp = by.get(label("ddp", None, True))
    if ddp and comp:
        ratio = ddp["bytes"] / max(c["bytes"] for c in comp)
        claims.append(claim("ddp bytes / composed bytes (all faults)", ratio, ">= 100", ratio >= 100))
        wall = ddp["wall_s"] / max(c["wall_s"] for c in comp)
        claims.append(claim("ddp wall time / composed wall time (all faults, emulated links)", wall, "> 1", wall > 1))
    if comp:
        lost = max(c["steps_redone"] for c in comp)
        claims.append(claim("steps lost to the crash (composed, peer recovery)", lost, "= 0", lost == 0))
    return table, claims


def picture(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    seen: dict[str, int] = {}
    for r in rows:
        i = seen.setdefault(r["label"], len(seen))
        t, loss = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(t, loss, color=colors[i % len(colors)], lw=1, alpha=0.8,
                label=r["label"] if r["seed"] == rows[0]["seed"] else None)
        for x in r["faults_at"]:
            ax.axvline(x, color=colors[i % len(colors)], ls=":", lw=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title("A hostile world: loss vs wall time (dotted: a crash detected / recovered)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    import ray

    from raylane.train import start_local_ray

    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--h", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="40 steps, H=10, one seed: to check the script")
    args = p.parse_args()
    steps, h = (40, 10) if args.quick else (args.steps, args.h)
    seeds = [0] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    store = RESULTS / ("hostile_quick_runs.json" if args.quick else "hostile_runs.json")
    setting = {"steps": steps, "h": h, "workers": WORKERS}
    stored = json.loads(store.read_text()) if store.exists() else {"setting": setting, "rows": []}
    kept = [r for r in stored["rows"] if r["seed"] not in seeds] if stored.get("setting") == setting else []
    crash_at = h * (steps // h // 2) + h // 4 + 1  # mid-run, at a step where no fragment syncs (every H/2)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start_local_ray(os.cpu_count() or 2)
        try:
            for seed, system, attack, faulty in plan(seeds):
                overrides = [*common(steps, h, seed, tmp), *SYSTEMS[system],
                             *([] if system == "ddp" else [f"strategy.sync_every={h}"]),
                             f"run.name={system}_{attack}_{int(faulty)}_{seed}"]
                if faulty:
                    overrides.append(fault_events(steps, attack, crash_at))
                if attack and system == "streaming":  # the mean, over gathered rows: so a row can be forged
                    overrides.append("strategy.outer.aggregator=mean")
                row = run_one(system, overrides)
                row.update(label=label(system, attack, faulty), seed=seed, attack=attack, faulty=faulty)
                rows.append(row)
                print({k: v for k, v in row.items() if k not in ("curve", "faults_at")}, flush=True)
        finally:
            ray.shutdown()
    rows = sorted(kept + rows, key=lambda r: r["seed"])
    store.write_text(json.dumps({"setting": setting, "rows": rows}))
    seeds = sorted({r["seed"] for r in rows})
    table, claims = summarize(rows)
    picture(rows, RESULTS / "hostile.png")
    notes = (f"{WORKERS} workers x {2 / WORKERS} CPU on {os.cpu_count()} cores; char LM (the default model), "
             f"{steps} steps, H = {h}, P = 2 fragments, checkpoints every H steps; crash of worker {CRASH_RANK} "
             f"at step {crash_at}; Byzantine replica {BYZANTINE_RANK}; seeds {seeds}. Medians over seeds with "
             f"[min, max]; bytes: the Communicator's counted payload bytes of all workers. Load average before "
             f"{tuple(round(x, 1) for x in load_before)}, after {tuple(round(x, 1) for x in os.getloadavg())}. "
             "Picture: benchmarks/results/hostile.png; every run: hostile_runs.json.")
    print(write("hostile", table, claims, notes).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
