"""Claim: gradient coding beats waiting for stragglers, close to what the straggler pattern allows,
and every scheme trains exactly the models uncoded training does.

8 workers of 0.25 CPU on one embedded Ray cluster, the same char transformer, data, steps and
seed for every scheme of strategy `gradient_coding`:
  uncoded (wait for all) | gc (FRC, s) | sr_sgc (B, W, lambda) | m_sgc (B, W, lambda),
under two straggler patterns injected as real (cancellable) sleeps on the workers:
- `bursty`: a seeded on/off pattern (straggler_rule=silence, the default);
- `lambda_trace`: the AWS Lambda profiles of the SGC authors (../shared/data/stragglers beside the
  repository), replayed as their simulator does (straggler model `trace_load`): worker i's whole
  response time in round r is column i of the profile at the load the scheme gives each worker
  (interpolated between the measured loads), times SCALE; the authors' straggler rule
  (straggler_rule=fastest: slower than (1 + mu) x the fastest).
Every scheme trains the same `streams` models round-robin (the largest delay T + 1). Systems run
interleaved, REPS times each; rows carry the median and (min, max) of the total time.

Per scheme: total time (all rounds + the final flush), its trace-only limit (benchmarks/
straggler_sim.py: raylane's own round rule replayed on the same injected delays with free
compute, computed from the same rows), speedups over uncoded (measured and limit), stragglers,
violations, load, bytes, and max |params - uncoded's| over every model trained (all streams,
all ranks agree) and every repetition. Writes benchmarks/results/stragglers.{json,md}.

    python benchmarks/stragglers.py [--quick] [--patterns bursty,lambda_trace]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import claim, median, write  # noqa: E402

WORKERS, SCALE, MU = 8, 0.5, 0.5
TRACE = str(Path(__file__).resolve().parents[2] / "shared/data/stragglers/lambda-canada-w256-load0000.csv")
PATTERNS = {
    "bursty": ("{model: bursty, delay_s: 1.0, p_on: 0.04, p_off: 0.9}", "silence"),
    "lambda_trace": (f"{{model: trace_load, trace: {TRACE}, scale: {SCALE}}}", "fastest"),
}
SCHEMES = {
    "uncoded": ["strategy.scheme=uncoded"],
    "gc": ["strategy.scheme=gc", "strategy.s=1", "strategy.code=frc"],
    "sr_sgc": ["strategy.scheme=sr_sgc", "strategy.burst=1", "strategy.window=3", "strategy.lam=3"],
    "m_sgc": ["strategy.scheme=m_sgc", "strategy.burst=1", "strategy.window=3", "strategy.lam=3"],
}
MODEL = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "data.seq_len=64", "data.batch_size=36",
         "optim.warmup_steps=5", "logging=quiet", "train.eval_every=0", "checkpoint.every=0", "data.eval_batches=1",
         f"cluster.num_workers={WORKERS}", "cluster.cpus_per_worker=0.25", "strategy=gradient_coding",
         f"strategy.mu={MU}"]


def _cfg(root: str, pattern: str, scheme: str, steps: int, streams: int, rep: int):
    from raylane import config

    stragglers, rule = PATTERNS[pattern]
    return config.load([*MODEL, f"train.steps={steps}", f"run.root={root}", f"run.name={pattern}-{scheme}-{rep}",
                        f"strategy.streams={streams}", f"strategy.stragglers={stragglers}",
                        f"strategy.straggler_rule={rule}", *SCHEMES[scheme]])


def run_one(cfg) -> dict:
    """Train (the driver's finish flushes the jobs in flight); totals and every model trained."""
    import torch

    from raylane.orchestrator.coordinator import Coordinator

    coord = Coordinator(cfg)
    try:
        coord.train()
        states = coord.group.get(coord.group.call("state_dict"))
    finally:
        coord.close()
    models = []
    for s in states:  # stream 0 is the model; streams 1.. live in the worker half's state
        replica = s["replica"]
        streams = [torch.cat([t.reshape(-1).double() for t in replica["model"].values()])]
        streams += [torch.cat([t.reshape(-1).double() for t in st["tensors"]]) for st in replica["strategy"]["streams"]]
        models.append(streams)
    for other in models[1:]:
        assert all(torch.equal(a, b) for a, b in zip(models[0], other)), "replicas diverged"
    return {"totals": dict(coord.driver.totals), "models": models[0], "load": coord.driver.schedule.load,
            "final_loss": coord.driver.last_loss}


def limit(pattern: str, scheme: str, steps: int, streams: int) -> float:
    """Total seconds of the trace-only limit (straggler_sim.py) on the same injected delays."""
    from benchmarks.straggler_sim import trace_only
    from raylane.strategies.gradient_coding.strategy import build_schedule

    cfg = _cfg(tempfile.gettempdir(), pattern, scheme, steps, streams, 0)
    schedule = build_schedule(cfg.strategy, WORKERS)
    model = cfg.strategy.stragglers
    return sum(trace_only(schedule, lambda i, r: model.delay(cfg.strategy.seed, i, r, schedule.load), steps,
                          cfg.strategy.straggler_rule, cfg.strategy.mu))


def row(pattern: str, scheme: str, runs: list[dict], ref: dict, limit_s: float, limit_unc: float) -> dict:
    totals = [r["totals"]["round_s"] for r in runs]
    t = runs[0]["totals"]
    per_stream = [max(float((r["models"][m] - ref["models"][m]).abs().max()) for r in runs)
                  for m in range(len(ref["models"]))]
    return {"pattern": pattern, "system": scheme, "params": " ".join(o.split(".", 1)[1] for o in SCHEMES[scheme][1:]),
            "reps": len(runs), "total_s_median": median(totals), "total_s_min": min(totals), "total_s_max": max(totals),
            "trace_only_s": limit_s, "overhead_x": median(totals) / limit_s if limit_s else None,
            "trace_only_speedup": limit_unc / limit_s if limit_s else None,
            "stragglers": int(t["stragglers"]), "violations": int(t["violations"]),
            "load": round(runs[0]["load"] * WORKERS, 3),
            "bytes_sent_per_round": t["bytes_sent"] / max(1, t["rounds"] + t["flush_rounds"]),
            "final_train_loss": runs[0]["final_loss"], "models_compared": len(ref["models"]),
            "max_abs_diff_vs_uncoded": max(per_stream),
            "max_abs_diff_per_stream": " ".join(f"{d:.2g}" for d in per_stream)}


def claims_for(pattern: str, rows: list[dict]) -> list[dict]:
    by = {r["system"]: r for r in rows if r["pattern"] == pattern}
    for r in by.values():
        r["speedup_vs_uncoded"] = by["uncoded"]["total_s_median"] / r["total_s_median"]
    gc, ms = by["gc"], by["m_sgc"]
    diff = max(r["max_abs_diff_vs_uncoded"] for r in by.values())
    out = [claim(f"{pattern}: gc speedup over uncoded (median total time)", gc["speedup_vs_uncoded"], "> 1.0",
                 gc["speedup_vs_uncoded"] > 1.0)]
    if gc["trace_only_speedup"]:  # none where the pattern alone lets coding skip every delay (limit 0 s)
        closeness = gc["speedup_vs_uncoded"] / gc["trace_only_speedup"]
        out.append(claim(f"{pattern}: gc speedup / its trace-only limit ({gc['trace_only_speedup']:.3f})", closeness,
                         ">= 0.75 (close to what the pattern allows)", closeness >= 0.75))
    ratio = gc["total_s_median"] / ms["total_s_median"]
    return out + [claim(f"{pattern}: m_sgc speedup over gc (median total time)", ratio, "> 1.0", ratio > 1.0),
                  claim(f"{pattern}: max |params - uncoded| over all schemes, streams and reps, x 1e-6", diff * 1e6,
                        "<= 10 (1e-5)", diff <= 1e-5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one repetition, to check that it runs")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated subset of {list(PATTERNS)}")
    args = parser.parse_args()
    steps, reps = (6, 1) if args.quick else (30, 3)

    from raylane.strategies.gradient_coding.strategy import GradientCodingConfig
    from raylane.train import start_local_ray

    delays = [GradientCodingConfig(**{o.split(".", 1)[1].split("=")[0]: _value(o) for o in ov}).delay
              for ov in SCHEMES.values()]
    streams = max(delays) + 1
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    os.environ.setdefault("RAY_ADDRESS", "local")  # always a fresh embedded cluster, never a stray one
    start_local_ray(num_cpus=WORKERS // 4)
    rows: list[dict] = []
    claims: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        for pattern in args.patterns.split(","):
            runs: dict[str, list[dict]] = {s: [] for s in SCHEMES}
            for rep in range(reps):  # interleaved: every scheme once per repetition
                for scheme in SCHEMES:
                    runs[scheme].append(run_one(_cfg(root, pattern, scheme, steps, streams, rep)))
                    print(f"{pattern:13s} rep {rep} {scheme:8s} {runs[scheme][-1]['totals']['round_s']:6.1f}s",
                          flush=True)
            limits = {s: limit(pattern, s, steps, streams) for s in SCHEMES}
            rows += [row(pattern, s, rs, runs["uncoded"][0], limits[s], limits["uncoded"]) for s, rs in runs.items()]
            claims += claims_for(pattern, rows)
    notes = (f"{steps} steps x {reps} interleaved repetitions, {WORKERS} workers x 0.25 CPU on a "
             f"{os.cpu_count()}-core machine, streams={streams} for every scheme, mu={MU}. "
             f"Patterns (stragglers, straggler_rule): {PATTERNS}. "
             f"total_s: all rounds + the final flush (driver time). trace_only_s: the same rule on the injected delays "
             f"alone (straggler_sim.py). load: per-round fraction of a job's data per worker, x {WORKERS}. "
             f"Load average before: {load_before}.")
    path = write("stragglers", rows, claims, notes)
    print(path.with_suffix(".md").read_text())


def _value(override: str):
    key, value = override.split("=", 1)
    return int(value) if value.isdigit() else value


if __name__ == "__main__":
    main()
