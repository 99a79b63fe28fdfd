"""Claim: gradient coding beats waiting for stragglers, and ends with the same parameters.

One run, 8 workers of 0.25 CPU on one embedded Ray cluster, the same char transformer, data,
steps and seed for every scheme of strategy `gradient_coding`:
  uncoded (wait for all) | gc (FRC, s) | sr_sgc (B, W, lambda) | m_sgc (B, W, lambda),
under two straggler patterns injected as real (cancellable) sleeps on the workers: a seeded
bursty on/off pattern, and a replay of the AWS Lambda trace (../shared/data/stragglers beside the repository,
256 workers, load 0; worker i replays column i, scaled to local step times). Every scheme
trains the same `streams` models round-robin (the largest delay T + 1), so all of them can be
compared with uncoded's final parameters.

Per scheme: time per round (median, mean), total time (all rounds + the final flush), time to a
target loss (the loss uncoded reaches at 80% of the steps, averaged over `streams` jobs),
stragglers tolerated, violations (rounds that had to wait outside the scheme's straggler model),
computational load (the scheme's, and measured), bytes sent, max |params - uncoded's|.
Writes benchmarks/results/stragglers.{json,md}.

    python benchmarks/stragglers.py [--quick]
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

WORKERS = 8
TRACE = str(Path(__file__).resolve().parents[2] / "shared/data/stragglers/lambda-canada-w256-load0000.csv")
PATTERNS = {
    "bursty": "{model: bursty, delay_s: 1.5, p_on: 0.04, p_off: 0.9}",
    "lambda_trace": f"{{model: trace, trace: {TRACE}, scale: 1.0}}",
}
SCHEMES = {
    "uncoded": ["strategy.scheme=uncoded"],
    "gc": ["strategy.scheme=gc", "strategy.s=1", "strategy.code=frc"],
    "sr_sgc": ["strategy.scheme=sr_sgc", "strategy.burst=1", "strategy.window=3", "strategy.lam=3"],
    "m_sgc": ["strategy.scheme=m_sgc", "strategy.burst=1", "strategy.window=3", "strategy.lam=3"],
}
MODEL = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "data.seq_len=64", "data.batch_size=36",
         "optim.warmup_steps=5", "logging=quiet", "train.eval_every=0", "checkpoint.every=0",
         f"cluster.num_workers={WORKERS}", "cluster.cpus_per_worker=0.25", "strategy=gradient_coding",
         "strategy.mu=0.5"]


def _cfg(root: str, pattern: str, scheme: str, steps: int, streams: int):
    from raylane import config

    return config.load([*MODEL, f"train.steps={steps}", f"run.root={root}", f"run.name={pattern}-{scheme}",
                        f"strategy.streams={streams}", f"strategy.stragglers={PATTERNS[pattern]}",
                        *SCHEMES[scheme]])


def run_one(cfg) -> dict:
    """Train, flush the jobs in flight; per-round metrics, totals, final parameters."""
    from raylane.orchestrator.coordinator import Coordinator

    coord = Coordinator(cfg)
    try:
        t0 = time.perf_counter()
        coord.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        coord.driver.flush(coord.group)
        flush_s = time.perf_counter() - t0
        final_loss = coord.driver.last_loss  # the last job's, decoded by the flush when T > 0
        params = coord.group.get(coord.group.call("flat_parameters"))[0]
    finally:
        coord.close()
    lines = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train/round_s" in x]
    return {"round_s": [x["train/round_s"] for x in steps], "loss": [x["train/loss"] for x in steps],
            "flush_s": flush_s, "train_s": train_s, "final_loss": final_loss, "totals": dict(coord.driver.totals),
            "params": params,
            "load": coord.driver.schedule.load, "global_batch": WORKERS * cfg.data.batch_size}


def smoothed(xs: list[float], k: int) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def time_to(losses: list[float], round_s: list[float], target: float, k: int) -> float | None:
    elapsed = 0.0
    for loss, dt in zip(smoothed(losses, k), round_s):
        elapsed += dt
        if loss <= target:
            return elapsed
    return None


def row(pattern: str, scheme: str, r: dict, ref: dict, target: float, streams: int, warmup: int) -> dict:
    t, rounds = r["totals"], len(r["round_s"])
    to_target = time_to(r["loss"], r["round_s"], target, streams)
    return {"pattern": pattern, "system": scheme, "params": " ".join(o.split(".", 1)[1] for o in SCHEMES[scheme][1:]),
            "round_s_median": median(r["round_s"][warmup:]),
            "round_s_mean": sum(r["round_s"][warmup:]) / max(1, rounds - warmup),
            "total_s": sum(r["round_s"]) + r["flush_s"], "time_to_target_s": to_target,
            "stragglers_tolerated": int(t["stragglers"]), "violations": int(t["violations"]),
            "load": round(r["load"] * WORKERS, 3),
            "load_measured": round(t["samples_computed"] / ((t["rounds"] + t["flush_rounds"]) * r["global_batch"]), 3),
            "bytes_sent_per_round": t["bytes_sent"] / max(1, t["rounds"] + t["flush_rounds"]),
            "final_train_loss": r["final_loss"],
            "max_abs_diff_vs_uncoded": float((r["params"] - ref["params"]).abs().max())}


def claims_for(pattern: str, rows: list[dict]) -> list[dict]:
    by = {r["system"]: r for r in rows if r["pattern"] == pattern}
    unc, gc, ms = by["uncoded"]["total_s"], by["gc"]["total_s"], by["m_sgc"]["total_s"]
    diff = max(r["max_abs_diff_vs_uncoded"] for r in by.values())
    return [claim(f"{pattern}: gc speedup over uncoded (total time)", unc / gc, ">= 1.25 (20% faster)",
                  unc / gc >= 1.25),
            claim(f"{pattern}: m_sgc speedup over gc (total time)", gc / ms, "> 1.0", gc / ms > 1.0),
            claim(f"{pattern}: max |params - uncoded| over all schemes, x 1e-6", diff * 1e6, "<= 10 (1e-5)",
                  diff <= 1e-5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, to check that it runs")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated subset of {list(PATTERNS)}")
    args = parser.parse_args()
    steps, warmup = (16, 2) if args.quick else (60, 3)

    from raylane.strategies.gradient_coding import GradientCodingConfig
    from raylane.train import start_local_ray

    delays = [GradientCodingConfig(**{o.split(".", 1)[1].split("=")[0]: _value(o) for o in ov}).delay
              for ov in SCHEMES.values()]
    streams = max(delays) + 1
    os.environ.setdefault("RAY_ADDRESS", "local")  # always a fresh embedded cluster, never a stray one
    start_local_ray(num_cpus=WORKERS // 4)
    rows: list[dict] = []
    claims: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        for pattern in args.patterns.split(","):
            results = {}
            for scheme in SCHEMES:
                results[scheme] = run_one(_cfg(root, pattern, scheme, steps, streams))
                print(f"{pattern:13s} {scheme:8s} total {sum(results[scheme]['round_s']):6.1f}s "
                      f"{results[scheme]['totals']}", flush=True)
            ref = results["uncoded"]
            target = smoothed(ref["loss"], streams)[int(0.8 * steps) - 1]
            rows += [row(pattern, s, r, ref, target, streams, warmup) for s, r in results.items()]
            claims += claims_for(pattern, rows)
    notes = (f"{steps} steps, {WORKERS} workers x 0.25 CPU on a {os.cpu_count()}-core machine, streams={streams} "
             f"for every scheme. Patterns: {PATTERNS}. Target loss: uncoded's, averaged over {streams} jobs, at step "
             f"{int(0.8 * steps)}. load: per-round fraction of a job's data per worker, x {WORKERS}.")
    path = write("stragglers", rows, claims, notes)
    print(path.with_suffix(".md").read_text())


def _value(override: str):
    key, value = override.split("=", 1)
    return int(value) if value.isdigit() else value


if __name__ == "__main__":
    main()
