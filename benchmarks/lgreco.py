"""Claim: L-GreCo's per-layer levels send fewer bytes than any uniform level at the same final loss.

One run, 4 workers (0.5 CPU each) on one local Ray cluster, the char-LM, the same steps, data,
optimizer and seed for every system; repeated with seeds 0, 1, 2, ... interleaved (every system
once per seed, in turn):
1. ddp (fp32 gradient all-reduce every step);
2. uniform levels, through the same `lgreco` code with `adaptive: false` (same warm-up, same
   per-layer error feedback, same small-layer threshold): PowerSGD rank 1, 2 and 3, top-k 0.5% and 1%,
   int4, int2 and sign (every family's default and the cheaper levels its L-GreCo may pick, so that a
   uniform setting L-GreCo drifts to is a baseline too);
3. L-GreCo (alpha, delta, adjust_every from the command line) per family (powersgd, topk, quant,
   default level = that family's uniform one above) and mixed (every family's candidates, default int4).
Bytes are the Communicator's counted payload bytes of training, summed over workers (L-GreCo's
error-table all-gathers included); bytes_after_warmup counts only the steps after the full-precision
warm-up (the part the levels decide; the claims use the totals); eval loss is the final one over
data.eval_batches held-out batches. Rows carry the median over seeds and the spread (min, max). Writes
benchmarks/results/lgreco.{json,md} and lgreco.png (final eval loss vs bytes, log scale).

    python benchmarks/lgreco.py [--quick] [--steps N] [--seeds K] [--lock /tmp/raylane-heavy.lock]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, claim, write  # noqa: E402

WORKERS = 4
LOSS_TOL = 0.01  # "the same final loss": within 1%


def systems(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(name, kind, overrides); kind: ddp | uniform | lgreco."""
    lg = ["strategy=lgreco", f"strategy.warmup_steps={args.warmup}", f"strategy.adjust_every={args.adjust_every}",
          f"strategy.accumulate_steps={args.accumulate}", f"strategy.min_numel={args.min_numel}"]
    uniform = [*lg, "strategy.adaptive=false"]
    adaptive = [*lg, f"strategy.alpha={args.alpha}", f"strategy.delta={args.delta}", *args.set]
    return [("ddp", "ddp", ["strategy=ddp"]),
            ("uniform powersgd:1", "uniform", [*uniform, "strategy.family=powersgd", "strategy.default_level=powersgd:1"]),
            ("uniform powersgd:2", "uniform", [*uniform, "strategy.family=powersgd", "strategy.default_level=powersgd:2"]),
            ("uniform powersgd:3", "uniform", [*uniform, "strategy.family=powersgd", "strategy.default_level=powersgd:3"]),
            ("uniform topk:0.005", "uniform", [*uniform, "strategy.family=topk", "strategy.default_level=topk:0.005"]),
            ("uniform topk:0.01", "uniform", [*uniform, "strategy.family=topk", "strategy.default_level=topk:0.01"]),
            ("uniform int4", "uniform", [*uniform, "strategy.family=quant", "strategy.default_level=int4"]),
            ("uniform int2", "uniform", [*uniform, "strategy.family=quant", "strategy.default_level=int2"]),
            ("uniform sign", "uniform", [*uniform, "strategy.family=quant", "strategy.default_level=sign"]),
            ("lgreco powersgd", "lgreco", [*adaptive, "strategy.family=powersgd", "strategy.default_level=powersgd:2"]),
            ("lgreco topk", "lgreco", [*adaptive, "strategy.family=topk", "strategy.default_level=topk:0.01"]),
            ("lgreco quant", "lgreco", [*adaptive, "strategy.family=quant", "strategy.default_level=int4"]),
            ("lgreco mixed", "lgreco", [*adaptive, "strategy.family=mixed", "strategy.default_level=int4"])]


def common(args: argparse.Namespace, root: str, seed: int) -> list[str]:
    return [f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", f"cluster.num_workers={WORKERS}",
            "cluster.cpus_per_worker=0.5", "logging=quiet", f"train.steps={args.steps}", "train.eval_every=0",
            f"data.eval_batches={args.eval_batches}", f"optim.warmup_steps={args.warmup}", "checkpoint.every=0",
            "resume=false", f"run.root={root}", f"seed={seed}"]


def run_one(overrides: list[str], name: str, warmup: int) -> dict:
    from raylane import config
    from raylane.orchestrator.coordinator import Coordinator

    cfg = config.load([*overrides, f"run.name={name}"])
    coord = Coordinator(cfg)
    try:
        summary = coord.train()
        levels = coord.group.get(coord.group.call("levels"))[0] if cfg.strategy.name == "lgreco" else {}
    finally:
        coord.close()
    lines = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train/loss" in x]
    return {"eval_loss": [x for x in lines if "eval/loss" in x][-1]["eval/loss"],
            "bytes_total": sum(x["comm/bytes_sent"] for x in steps),
            "bytes_after_warmup": sum(x["comm/bytes_sent"] for x in steps if x["step"] > warmup), "train_s": sum(x["train/round_s"] for x in steps),
            "levels": levels}


def summarise(name: str, kind: str, runs: list[dict]) -> dict:
    row = {"system": name, "kind": kind}
    for key in ("eval_loss", "bytes_total", "bytes_after_warmup", "train_s"):
        xs = [r[key] for r in runs]
        row.update({key: statistics.median(xs), f"{key}_min": min(xs), f"{key}_max": max(xs)})
    row["runs"] = len(runs)
    return row


def claims(rows: list[dict]) -> list[dict]:
    ddp = next(r for r in rows if r["kind"] == "ddp")
    uniform = [r for r in rows if r["kind"] == "uniform"]
    out = []
    for r in (r for r in rows if r["kind"] == "lgreco"):
        same_loss = [u for u in uniform if u["eval_loss"] <= r["eval_loss"] * (1 + LOSS_TOL)]
        if same_loss:
            best = min(same_loss, key=lambda u: u["bytes_total"])
            x = best["bytes_total"] / r["bytes_total"]
            out.append(claim(f"{best['system']} bytes / {r['system']} bytes (best uniform with loss <= "
                             f"{r['system']}'s +1%)", x, ">= 1.5", x >= 1.5))
        else:
            out.append(claim(f"no uniform level reaches {r['system']}'s loss +1% (bytes ratio vs the lowest-loss "
                             "uniform, which errs more)", min(uniform, key=lambda u: u["eval_loss"])["bytes_total"]
                             / r["bytes_total"], ">= 1.5 at the same loss", False))
        gap = r["eval_loss"] / ddp["eval_loss"] - 1
        x = ddp["bytes_total"] / r["bytes_total"]
        out.append(claim(f"ddp bytes / {r['system']} bytes (loss gap to ddp {gap:+.2%})", x,
                         ">= 5 within 1% of ddp's loss", x >= 5 and gap <= LOSS_TOL))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    marks = {"ddp": ("k", "s"), "uniform": ("tab:blue", "o"), "lgreco": ("tab:red", "*")}
    for r in rows:
        color, marker = marks[r["kind"]]
        ax.errorbar(r["bytes_total"], r["eval_loss"], yerr=[[r["eval_loss"] - r["eval_loss_min"]],
                    [r["eval_loss_max"] - r["eval_loss"]]], fmt=marker, color=color, ms=9 if marker == "*" else 6)
        ax.annotate(r["system"], (r["bytes_total"], r["eval_loss"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training bytes sent, all workers (log)")
    ax.set_ylabel("final eval loss (median over seeds)")
    ax.set_title("L-GreCo vs uniform compression vs ddp (4 workers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@contextlib.contextmanager
def heavy_lock(path: str):
    """An exclusive flock on `path` for the duration ("" : none)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    import ray

    from raylane.train import start_local_ray

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a few steps, one seed: checks the script works")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--adjust-every", type=int, default=50)
    p.add_argument("--accumulate", type=int, default=5)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=0.001)
    p.add_argument("--min-numel", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--only", default="", help="comma-separated system names (default: all)")
    p.add_argument("--set", action="append", default=[], help="an extra override for the L-GreCo systems (repeatable)")
    p.add_argument("--out", default="lgreco", help="results file name (benchmarks/results/OUT.{json,md,png})")
    p.add_argument("--lock", default="", help="a file to flock for each round of systems (shared machines)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds, args.warmup, args.adjust_every, args.accumulate = 12, 1, 3, 4, 2
        args.min_numel, args.eval_batches, args.d_model = 256, 4, 32
    chosen = [s for s in systems(args) if not args.only or s[0] in args.only.split(",")]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):  # interleaved: every system once per seed
            with heavy_lock(args.lock):  # held for one round, so that others' tests interleave
                start_local_ray(os.cpu_count() or 2)
                try:
                    for i, (name, kind, overrides) in enumerate(chosen):
                        runs[name].append(run_one([*common(args, tmp, seed), *overrides], f"s{i}-seed{seed}", args.warmup))
                        print(name, seed, {k: v for k, v in runs[name][-1].items() if k != "levels"}, flush=True)
                finally:
                    ray.shutdown()
    rows = [summarise(name, kind, runs[name]) for name, kind, _ in chosen]
    out = "lgreco_quick" if args.quick else args.out
    notes = (f"{WORKERS} workers x 0.5 CPU on {os.cpu_count()} cores; char transformer n_layer={args.n_layer} "
             f"d_model={args.d_model}, batch 16x64 chars per worker, {args.steps} steps, AdamW (lr 3e-3, cosine, "
             f"{args.warmup} warm-up steps), seeds 0..{args.seeds - 1} interleaved; compressed systems send full "
             f"precision for the first {args.warmup} steps and for layers under {args.min_numel} values. "
             f"L-GreCo: alpha={args.alpha}, delta={args.delta}, re-chosen every {args.adjust_every} steps from "
             f"{args.accumulate} accumulated steps, extra overrides {args.set}. "
             f"Load average before {load_before}, after {os.getloadavg()}.\n\n"
             "Levels chosen at the end (seed 0):\n\n" + "\n".join(
                 f"- {name}: " + ", ".join(f"{k}={v}" for k, v in runs[name][0]["levels"].items())
                 for name, kind, _ in chosen if kind == "lgreco"))
    path = write(out, rows, claims(rows) if any(r["kind"] == "ddp" for r in rows) else [], notes)
    if not args.quick:
        plot(rows, RESULTS / f"{out}.png")
    doc = json.loads(path.read_text())
    doc.update(load_before=load_before, load_after=os.getloadavg())
    path.write_text(json.dumps(doc, indent=1))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
