"""Claims (issue 22): full-graph GNN training on a real graph and on a large synthetic one.

(a) Cora (the Planetoid public split, ../shared/data/graphs/cora): a 2-layer GCN and a 16-layer GCNII,
    trained by `single` (one process, the whole model on the whole graph), `graph_parallel` (2 METIS
    parts), `gnnpipe` (2 stages, 4 chunks) and `hybrid` (2 stages x 2 ways, 4 chunks); test accuracy at
    the best-validation epoch (evaluated every epoch; the literature's protocol) and at the last epoch,
    mean and spread over >= 5 seeds. Claims: single-process GCN >= 80%; gnnpipe and hybrid within 1.5
    points of the single process (GCN; GCNII reported with the same goal).
(b) A contextual SBM of 100k vertices, residual GCN of L in {8, 32} layers (width 32), 4 workers:
    `graph_parallel` (4 METIS parts: the baseline), `gnnpipe` (4 stages), `hybrid` (2 stages x 2
    ways) and `gnnpipe_s2` (2 stages on 2 workers: the pipeline the hybrid adds a second way to).
    Bytes per epoch (all ranks, counted by the Communicators), time per epoch (slowest rank, between
    barriers; 4 processes share this machine's cores), peak resident memory per worker (the largest
    rank's ru_maxrss; also above what the process held after setup), accuracy. L = 8 trains long
    enough for the accuracy claim (hybrid within 1 point of graph_parallel); L = 32 runs a few epochs:
    its claims are bytes (graph_parallel >= 2x gnnpipe's), time and memory, its accuracy is not.

Each `--part` (and `--first-seed` slice of its seeds) is one invocation of a few minutes; its runs
are stored in results/gnn.json (`runs`, replacing runs of the same part, system and seed), the rows
are computed from every stored run and the claims from the rows. Systems are interleaved
within each seed; real TrainWorkers run as spawned processes over Gloo (benchmarks/_gnn_ranks.py),
1 torch thread each.

    python benchmarks/gnn.py --part cora-gcn|cora-gcnii|csbm-8|csbm-32 [--seeds N] [--first-seed N]
                             [--epochs N] [--systems a,b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402
from benchmarks._common import claim, median  # noqa: E402
from benchmarks._gnn_ranks import run_workers  # noqa: E402
from raylane.strategies.gnn.common import BestValidation  # noqa: E402

CORA_SYSTEMS = {"single": [], "graph_parallel": ["strategy=graph_parallel", "cluster.num_workers=2"],
                "gnnpipe": ["strategy=gnnpipe", "cluster.num_workers=2", "strategy.chunks=4"],
                "hybrid": ["strategy=hybrid", "cluster.num_workers=4", "strategy.chunks=4"]}
CSBM_SYSTEMS = {"graph_parallel": ["strategy=graph_parallel", "cluster.num_workers=4"],
                "gnnpipe": ["strategy=gnnpipe", "cluster.num_workers=4", "strategy.chunks=4"],
                "hybrid": ["strategy=hybrid", "cluster.num_workers=4", "strategy.chunks=4"],
                "gnnpipe_s2": ["strategy=gnnpipe", "cluster.num_workers=2", "strategy.chunks=4"]}
OPTIM = ["optim.grad_clip=0", "optim.beta2=0.999", "optim.schedule=constant"]
PARTS = {  # model / data / optimizer, epochs, eval every, lr, seeds
    "cora-gcn": (["model=gcn", "model.n_layer=2", "model.gnn_residual=false", "model.d_model=256",
                  "model.dropout=0.7", "optim.weight_decay=0.05", "data=cora"], 100, 1, 0.01, 5),
    "cora-gcnii": (["model=gcnii", "model.n_layer=16", "model.d_model=64", "model.dropout=0.6",
                    "optim.weight_decay=0.01", "data=cora"], 100, 5, 0.01, 5),
    "csbm-8": (["model=gcn", "model.n_layer=8", "model.d_model=32", "optim.weight_decay=0", "data=csbm",
                "data.graph.num_vertices=100000"], 20, 5, 0.01, 3),
    "csbm-32": (["model=gcn", "model.n_layer=32", "model.d_model=32", "optim.weight_decay=0", "data=csbm",
                 "data.graph.num_vertices=100000"], 4, 0, 0.01, 3),
}
QUICK = {"cora-gcn": ["data=csbm", "data.graph.num_vertices=300", "data.input_dim=16"],
         "cora-gcnii": ["data=csbm", "data.graph.num_vertices=300", "data.input_dim=16", "model.n_layer=4"],
         "csbm-8": ["data.graph.num_vertices=2000", "model.d_model=8"],
         "csbm-32": ["data.graph.num_vertices=2000", "model.d_model=8", "model.n_layer=8"]}


def _cfg(part: str, system: str, args: argparse.Namespace, seed: int, root: str):
    from raylane import config

    own = PARTS[part][0] + (QUICK[part] if args.quick else [])
    systems = CORA_SYSTEMS if part.startswith("cora") else CSBM_SYSTEMS
    strategy = systems[system] or ["strategy=graph_parallel", "cluster.num_workers=1"]
    return config.load([*strategy, *own, *OPTIM, f"seed={seed}", "logging=quiet", f"run.root={root}"])


def _single(cfg, epochs: int, eval_every: int, lr: float) -> dict:
    """The whole model on the whole graph in this process (1 thread): per-epoch accuracies."""
    import torch
    import torch.nn.functional as F

    from raylane.workers.data import build_dataset
    from raylane.workers.models import build_model
    from raylane.workers.optim import build_optimizer

    torch.set_num_threads(1)
    g = build_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, g.vocab_size, g.input_dim, cfg.data.seq_len, cfg.seed)
    torch.manual_seed(cfg.seed * 1000)  # dropout, as rank 0 of a TrainWorker
    opt = build_optimizer(model.parameters(), cfg.optim)
    for group in opt.param_groups:
        group["lr"] = lr
    evals = []
    for e in range(1, epochs + 1):
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(g.x, g.edge_index)[g.train_mask], g.y[g.train_mask]).backward()
        opt.step()
        if e % eval_every == 0 or e == epochs:
            model.eval()
            with torch.no_grad():
                pred = model(g.x, g.edge_index).argmax(-1)
            evals.append((e, *[float((pred[m] == g.y[m]).float().mean()) for m in (g.val_mask, g.test_mask)]))
    return _accuracy(evals)


def _accuracy(evals: list[tuple[int, float, float]]) -> dict:
    """Best-validation protocol over (epoch, val, test) evaluations, plus the last epoch's."""
    best = BestValidation()
    for e, val, test in evals:
        out = best.observe(e, val, test)
    return {"test_accuracy_at_best_val": out["eval/test_accuracy_at_best_val"],
            "best_val_accuracy": out["eval/best_val_accuracy"], "best_val_epoch": out["eval/best_val_step"],
            "test_accuracy_last": evals[-1][2], "val_accuracy_last": evals[-1][1]}


def _measure(ranks: list[dict]) -> dict:
    epochs = len(ranks[0]["steps"])
    per_epoch = [sum(r["steps"][e]["bytes_sent"] for r in ranks) for e in range(epochs)]
    times = [max(r["epoch_s"][e] for r in ranks) for e in range(epochs)]
    evals = []
    for i, (e, _) in enumerate(ranks[0]["evals"]):
        parts = [r["evals"][i][1] for r in ranks]
        acc = [sum(p[f"{v}/accuracy"][0] for p in parts) / sum(p[f"{v}/accuracy"][1] for p in parts)
               for v in ("model", "test")]
        evals.append((e, *acc))
    out = {"bytes_per_epoch": statistics.median(per_epoch), "time_per_epoch_s": statistics.median(times[1:] or times),
           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
           "peak_above_setup_bytes": max(r["peak_rss_bytes"] - r["rss_setup_bytes"] for r in ranks),
           "final_loss": ranks[0]["steps"][-1]["loss"], **_accuracy(evals)}
    out.update({k: v for k, v in ranks[0]["steps"][-1].items() if k.startswith(("gnnpipe/", "graph/"))})
    return out


STATS = ("test_accuracy_at_best_val", "test_accuracy_last", "best_val_accuracy", "bytes_per_epoch",
         "time_per_epoch_s", "peak_rss_bytes", "peak_above_setup_bytes", "final_loss")


def _row(part: str, system: str, runs: list[dict]) -> dict:
    row = {"part": part, "system": system, "runs": len(runs)}
    for key in STATS:
        xs = [r[key] for r in runs if key in r]
        if xs:
            row[key], row[f"{key}_min"], row[f"{key}_max"] = median(xs), min(xs), max(xs)
    for key in ("test_accuracy_at_best_val", "test_accuracy_last"):
        xs = [r[key] for r in runs]
        row[f"{key}_mean"], row[f"{key}_std"] = statistics.mean(xs), statistics.pstdev(xs)
    for key in sorted({k for r in runs for k in r if k.startswith(("gnnpipe/", "graph/"))}):
        row[key] = median([r[key] for r in runs if key in r])
    return row


def _claims(rows: list[dict]) -> list[dict]:
    by = {(r["part"], r["system"]): r for r in rows}
    out = []

    def acc(part: str, system: str) -> float:
        return 100 * by[(part, system)]["test_accuracy_at_best_val_mean"]

    if ("cora-gcn", "single") in by:
        v = acc("cora-gcn", "single")
        out.append(claim("cora GCN single-process test accuracy at best val (%, mean)", v, ">= 80", v >= 80))
    for part in ("cora-gcn", "cora-gcnii"):
        for system in ("gnnpipe", "hybrid", "graph_parallel"):
            if (part, system) in by and (part, "single") in by:
                d = acc(part, system) - acc(part, "single")
                out.append(claim(f"{part}: {system} - single test accuracy at best val (points, mean)", d,
                                 ">= -1.5", d >= -1.5))
    if ("csbm-8", "hybrid") in by and ("csbm-8", "graph_parallel") in by:
        d = acc("csbm-8", "hybrid") - acc("csbm-8", "graph_parallel")
        out.append(claim("csbm L=8: hybrid - graph_parallel test accuracy at best val (points)", d, ">= -1", d >= -1))
    for part in ("csbm-8", "csbm-32"):
        gp = by.get((part, "graph_parallel"))
        for system in ("gnnpipe", "hybrid"):
            if gp and (part, system) in by:
                ratio = gp["bytes_per_epoch"] / by[(part, system)]["bytes_per_epoch"]
                strict = part == "csbm-32" and system == "gnnpipe"
                out.append(claim(f"{part}: graph_parallel (METIS) bytes / {system} bytes per epoch", ratio,
                                 ">= 2" if strict else "reported", ratio >= 2 if strict else True))
                t = gp["time_per_epoch_s"] / by[(part, system)]["time_per_epoch_s"]
                out.append(claim(f"{part}: graph_parallel time / {system} time per epoch", t, "reported", True))
        for other in ("gnnpipe", "gnnpipe_s2"):
            if (part, "hybrid") in by and (part, other) in by:
                m = by[(part, "hybrid")]["peak_rss_bytes"] / by[(part, other)]["peak_rss_bytes"]
                out.append(claim(f"{part}: hybrid / {other} peak memory per worker", m, "< 1", m < 1))
    return out


def _stored(name: str) -> dict:
    path = _common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _merge(old: dict, part: str, new: dict[str, dict[int, dict]]) -> dict:
    """Stored runs {part: {system: {seed: run}}} with this invocation's runs put in."""
    runs = old.get("runs", {})
    for system, by_seed in new.items():
        runs.setdefault(part, {}).setdefault(system, {}).update({str(k): v for k, v in by_seed.items()})
    return runs


def _save(args: argparse.Namespace, part: str, results: dict, load_before: tuple, epochs: int, eval_every: int,
          lr: float, seeds: int) -> None:
    """Store this invocation's runs so far."""
    name = "gnn_quick" if args.quick else "gnn"
    old = _stored(name)
    runs = _merge(old, part, results)
    rows = [_row(pt, s, list(by_seed.values())) for pt in PARTS if pt in runs for s, by_seed in runs[pt].items()]
    load = ", ".join(f"{x:.2f}" for x in load_before), ", ".join(f"{x:.2f}" for x in os.getloadavg())
    notes = old.get("part_notes", {})
    cmd = f"`python {' '.join(sys.argv)}`"
    notes[part] = [n for n in notes.get(part, []) if not n.startswith(cmd)]
    notes[part].append(f"{cmd}: {'QUICK (tiny) run. ' if args.quick else ''}"
                       f"{' '.join(PARTS[part][0])}; {epochs} epochs (AdamW lr {lr}, constant), evaluated every "
                       f"{eval_every or epochs}; seeds {args.first_seed}..{args.first_seed + seeds - 1}; 1 thread "
                       f"per process on {os.cpu_count()} cores; load average before {load[0]}, after {load[1]}.")
    text = " ".join(f"[{k}] {' '.join(v)}" for k, v in sorted(notes.items()))
    _common.write(name, rows, _claims(rows), text)
    doc = json.loads((_common.RESULTS / f"{name}.json").read_text())
    doc["part_notes"], doc["runs"] = notes, runs
    (_common.RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1))



def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the harness's reaping on a kill
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=list(PARTS), required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--systems", default=None, help="comma-separated subset")
    args = p.parse_args()
    part = args.part
    _, epochs, eval_every, lr, seeds = PARTS[part]
    epochs = args.epochs or (3 if args.quick else epochs)
    seeds = args.seeds or (1 if args.quick else seeds)
    systems = list(CORA_SYSTEMS if part.startswith("cora") else CSBM_SYSTEMS)
    if args.systems:
        systems = [s for s in systems if s in args.systems.split(",")]
    load_before = os.getloadavg()
    results: dict[str, dict[int, dict]] = {s: {} for s in systems}
    with tempfile.TemporaryDirectory() as root:
        for seed in range(args.first_seed, args.first_seed + seeds):
            for system in systems:  # interleaved
                cfg = _cfg(part, system, args, seed, root)
                if system == "single":
                    res = _single(cfg, epochs, eval_every or epochs, lr)
                else:
                    res = _measure(run_workers(cfg, epochs, lr=lr, timeout_s=1800, eval_every=eval_every))
                results[system][seed] = res
                print(part, system, seed, {k: v for k, v in res.items() if not k.startswith("gnnpipe/")}, flush=True)
                done = seed + 1 - args.first_seed  # stored after every run: a killed invocation keeps its runs
                _save(args, part, {k: v for k, v in results.items() if v}, load_before, epochs, eval_every, lr, done)


if __name__ == "__main__":
    main()
