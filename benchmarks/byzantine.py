"""Claim: on a task where the attacks break the plain mean, the robust rules hold, the best by at
least 20 points of worst-case accuracy; Flag's worst case is within the seed spread of the best
rule's (or the result says by how much it is not); every rule aggregates n=15 x d=10M, Flag <= 1 s.

Task: scikit-learn's digits (shipped with the package, nothing downloaded), made larger
deterministically: every 8x8 image also appears shifted by one pixel up, down, left and right
(5 examples per image). The split is by source image (fixed permutation, seed 1234), so no shifted
copy of a test image is seen in training: 1,100 images -> 5,500 training examples, 200 -> 1,000
validation examples, 497 -> 2,485 test examples (>= 2,000; digits alone has 1,797 images in all).
Model: MLP 64-32-10 (d = 2,410), cross-entropy. Every worker sends its momentum (beta = 0.9,
m <- beta m + (1 - beta) g: worker momentum, the setting of Karimireddy et al. 2021 and of ByzFL's
benchmark; it lowers the honest rows' variance, which every rule's guarantee depends on); the
server steps w <- w - LR aggregate. Label-flipping workers keep their momentum on flipped labels.

Grid: n = 15 workers, f in {0, 3, 5} (Byzantine ranks 0..f-1, the rule told f); every rule x every
attack: alie (the paper's z), ipm (epsilon = 10: breaks the mean), alie_opt and ipm_opt (adaptive:
factor searched each round against the run's own pipeline and state, strategies/attacks.py; here
with SEARCH = 6 grid points and 1 golden-section step, 8 aggregations a round, to fit the time),
gaussian (row + N(0, 100²)), inf (+inf rows: dropped), mimic, label_flip; f = 0 without attack.
SEEDS seeds (data order, init, noise), interleaved. Rules' own parameters (centered clipping's
tau, Flag's r, Flag-with-lambda's r and lambda) tuned on the validation split at f = 5 (worst case
over the attacks, one seed not among the test seeds); accuracies reported on the test split.

In-process simulation, no Ray: per-worker gradients by torch.func.vmap on one process; the rows go
through raylane's own code (attacks.py, workers/chaos.corruption, blocks/aggregators/round.aggregate with the
Pipeline: non-finite rows dropped, f lowered). Two processes share the grid (torch threads = 1).

Aggregation time: every rule on a random (15, 10M) float32 matrix, f = 3 (Bulyan, SMEA, MDA as
configured), REPS times interleaved, median (min, max), torch threads = the machine's cores (`--threads`;
the aggregating process has the machine to itself: the driver, or every rank in turn).

    python benchmarks/byzantine.py --part tune|f3|f5|timing   (each writes results/byzantine_parts/)
    python benchmarks/byzantine.py --merge                     (results/byzantine.json, .md, .png)
    python benchmarks/byzantine.py --quick                     (tiny, for tests)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, claim, median, write  # noqa: E402

N = 15
SEEDS = [0, 1, 2, 3, 4]
TUNE_SEED = 1000
STEPS, BATCH, LR, MOMENTUM = 45, 32, 2.0, 0.9
SEARCH = (6, 1)      # the adaptive attacks' grid points and golden-section steps (library default: 12, 6)
ATTACKS = ["alie", "ipm", "alie_opt", "ipm_opt", "gaussian", "inf", "mimic", "label_flip"]
IPM_EPS, GAUSS_STD = 10.0, 100.0
RULES = ["mean", "median", "trimmed_mean", "meamed", "krum", "multi_krum", "bulyan", "geomed",
         "centered_clipping", "flag", "flag_lam", "mda", "smea", "monna", "caf"]
TUNE = {"centered_clipping": [{"tau": t} for t in (0.1, 1.0, 10.0)],
        "flag": [{"r": r} for r in (1, 4, 8)],
        "flag_lam": [{"r": 1, "lam": 1.0}, {"r": 8, "lam": 1.0}, {"r": 8, "lam": 5.0}]}
PARTS = RESULTS / "byzantine_parts"
H = 32


# -- data and model --------------------------------------------------------------------------
def load_data():
    """(train, val, test) as (x, y) tensors: digits with four one-pixel shifts, split by image."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))

    def expand(idx):
        x = img[idx]
        z = torch.zeros_like(x)
        ups = [x, z.clone(), z.clone(), z.clone(), z.clone()]
        ups[1][:, :-1], ups[2][:, 1:] = x[:, 1:], x[:, :-1]
        ups[3][:, :, :-1], ups[4][:, :, 1:] = x[:, :, 1:], x[:, :, :-1]
        return torch.cat(ups).reshape(-1, 64), y[idx].repeat(5)

    return expand(perm[697:]), expand(perm[497:697]), expand(perm[:497])


def unpack(w):
    a = 64 * H
    return w[:a].view(H, 64), w[a:a + H], w[a + H:a + H + 10 * H].view(10, H), w[a + H + 10 * H:]


def logits(w, x):
    import torch

    W1, b1, W2, b2 = unpack(w)
    return torch.relu(x @ W1.T + b1) @ W2.T + b2


def init(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(H, 64, generator=g) / 8.0
    W2 = torch.randn(10, H, generator=g) / H ** 0.5
    return torch.cat([W1.flatten(), torch.zeros(H), W2.flatten(), torch.zeros(10)])


def accuracy(w, data) -> float:
    import torch

    with torch.no_grad():
        return float((logits(w, data[0]).argmax(-1) == data[1]).float().mean())


# -- one training run ------------------------------------------------------------------------
def pipeline(rule: str, f: int, params: dict):
    from raylane.strategies.blocks.aggregators import registry
    from raylane.strategies.blocks.aggregators.pipeline import Pipeline

    name = "flag" if rule.startswith("flag") else rule
    cls = registry()[name]
    kw = dict(params)
    if rule == "monna":
        kw = {"pivot": N - 1}          # MoNNA's pivot must be honest: the last rank is
    return Pipeline(name, cls.config_cls(**kw), f)


def forge(attack: str, G, f: int, pipe, state, step: int, seed: int):
    """G with rows 0..f-1 replaced as `attack` says (G: every rank's honest momentum row)."""
    from raylane.strategies.blocks import attacks
    from raylane.strategies.blocks.aggregators.round import run_rule
    from raylane.workers.chaos import corruption

    ranks = list(range(f))
    honest = G[f:]
    target = lambda M: run_rule(pipe, M, state)[0].vector     # noqa: E731
    if attack == "alie":
        row = attacks.alie(honest, attacks.alie_z(N, f))
    elif attack == "ipm":
        row = attacks.ipm(honest, IPM_EPS)
    elif attack == "alie_opt":
        row = attacks.alie_opt(honest, ranks, N, target)[0]
    elif attack == "ipm_opt":
        row = attacks.ipm_opt(honest, ranks, N, target)[0]
    elif attack == "mimic":
        row = attacks.mimic(honest)
    else:
        G = G.clone()
        for r in ranks:
            G[r] = corruption(attack, GAUSS_STD, seed * 7919 + step * 31 + r)(G[r])
        return G
    return attacks.with_byzantine_rows(honest, ranks, N, row)


def per_worker_gradients(w, X, Y):
    """(N, d): each worker's mean cross-entropy gradient on its batch (X: (N, B, 64)), by hand in
    batched matmuls (the MLP's backward pass; checked against autograd in --quick)."""
    import torch

    W1, b1, W2, b2 = unpack(w)
    Z = X @ W1.T + b1
    A = torch.relu(Z)
    P = torch.softmax(A @ W2.T + b2, dim=-1)
    P[torch.arange(X.shape[0])[:, None], torch.arange(X.shape[1])[None, :], Y] -= 1
    dL = P / X.shape[1]                                         # d loss / d logits
    dA = (dL @ W2) * (Z > 0)
    return torch.cat([(dA.transpose(1, 2) @ X).flatten(1), dA.sum(1), (dL.transpose(1, 2) @ A).flatten(1),
                      dL.sum(1)], dim=1)


def train(rule: str, f: int, attack: str, seed: int, params: dict, data, steps: int = STEPS) -> float:
    """Final accuracy on the evaluation split of one run; 0 if it diverged (non-finite weights, or
    every row non-finite)."""
    import torch

    from raylane.strategies.blocks import attacks
    from raylane.strategies.blocks.aggregators.round import NotEnoughRows, aggregate

    (xtr, ytr), evald = data
    pipe = pipeline(rule, f, params)
    w, mom, state = init(seed), None, None
    g = torch.Generator().manual_seed(seed + 17)
    for step in range(1, steps + 1):
        idx = torch.randint(len(ytr), (N, BATCH), generator=g)
        X, Y = xtr[idx], ytr[idx]
        if f and attack == "label_flip":
            Y = torch.cat([attacks.flip_labels(Y[:f], 10), Y[f:]])
        G = per_worker_gradients(w, X, Y)
        if not bool(torch.isfinite(G).all()):
            return 0.0                      # the honest gradients overflowed: diverged
        mom = G if mom is None else MOMENTUM * mom + (1 - MOMENTUM) * G     # worker momentum
        rows = mom
        if f and attack not in ("none", "label_flip"):
            rows = forge(attack, mom, f, pipe, state, step, seed)
        try:
            res, _ = aggregate(pipe, rows, state, list(range(f)), False)
        except NotEnoughRows:
            return 0.0
        state = res.state
        w = w - LR * res.vector
        if not bool(torch.isfinite(w).all()):
            return 0.0
    return accuracy(w, evald)


def _job(args) -> tuple:
    import torch

    torch.set_num_threads(1)
    rule, f, attack, seed, params, split, steps = args
    tr, val, te = _DATA
    t0 = time.perf_counter()
    acc = train(rule, f, attack, seed, params, (tr, val if split == "val" else te), steps)
    return rule, f, attack, seed, json.dumps(params, sort_keys=True), split, acc, time.perf_counter() - t0


def _init_worker():
    from raylane.strategies.blocks import attacks

    global _DATA
    _DATA = load_data()
    attacks.SEARCH_GRID, attacks.SEARCH_REFINE = SEARCH


def run_jobs(jobs: list[tuple], procs: int, save=None) -> list[tuple]:
    """Every job's result; `save(results so far)` every 25 runs (a part cut short keeps them)."""
    import multiprocessing as mp

    out = []
    if procs == 1:
        _init_worker()
        return [_job(j) for j in jobs]
    with mp.get_context("spawn").Pool(procs, initializer=_init_worker) as pool:
        for i, r in enumerate(pool.imap_unordered(_job, jobs, chunksize=1)):
            out.append(r)
            if (i + 1) % 25 == 0:
                print(f"{i + 1}/{len(jobs)} runs", flush=True)
                if save:
                    save(out)
    return out


# -- parts ------------------------------------------------------------------------------------
def applicable(rule: str, f: int) -> bool:
    from raylane.strategies.blocks.aggregators import registry

    name = "flag" if rule.startswith("flag") else rule
    cls = registry()[name]
    return N >= cls.min_workers(None if cls.config_cls is type(None) else cls.config_cls(), f)[0]


def tuned() -> dict[str, dict]:
    path = PARTS / "tune.json"
    best = json.loads(path.read_text())["best"] if path.exists() else {}
    return {r: best.get(r, TUNE[r][0] if r in TUNE else {}) for r in RULES}


def part_tune(procs: int, steps: int) -> dict:
    jobs = [(r, 5, a, TUNE_SEED, p, "val", steps) for r, cands in TUNE.items() for p in cands for a in ATTACKS]
    res = run_jobs(jobs, procs)
    worst: dict[tuple, float] = {}
    for rule, f, attack, seed, params, split, acc, wall in res:
        worst[(rule, params)] = min(worst.get((rule, params), 1.0), acc)
    best = {r: json.loads(max((p for (rr, p) in worst if rr == r), key=lambda p: (worst[(r, p)], p))) for r in TUNE}
    rows = [{"rule": r, "params": p, "val_worst_accuracy": v} for (r, p), v in sorted(worst.items())]
    return {"best": best, "rows": rows, "runs": [list(x) for x in res]}


def part_grid(fs: list[int], procs: int, steps: int, seeds: list[int], rules: list[str], atks: list[str],
              name: str = "") -> dict:
    params = tuned()
    jobs = []
    for seed in seeds:            # seeds outermost: repetitions interleaved across configurations
        for f in fs:
            for rule in rules:
                if not applicable(rule, f):
                    continue
                for attack in (["none"] if f == 0 else ["none", *atks]):
                    jobs.append((rule, f, attack, seed, params[rule], "test", steps))
    def save(done):
        if name:
            (PARTS / f"{name}.json").write_text(json.dumps({"runs": [list(x) for x in done], "params": params,
                                                            "partial": f"{len(done)}/{len(jobs)}"}))
    return {"runs": [list(x) for x in run_jobs(jobs, procs, save)], "params": params}


def part_timing(d: int, reps: int, save: bool = False, threads: int = 1) -> dict:
    import torch

    torch.set_num_threads(threads)
    params = tuned()
    G = torch.randn(N, d, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {r: [] for r in RULES}

    def rows():
        return {"rows": [{"table": "aggregation_time", "rule": r, "n": N, "d": d, "f": 3,
                          "params": json.dumps(params[r]), "aggregate_s": median(t), "min_s": min(t),
                          "max_s": max(t), "reps": len(t), "threads": threads} for r, t in times.items() if t]}
    for _ in range(reps):          # interleaved; saved after every repetition (a part cut short keeps them)
        for rule in RULES:
            pipe = pipeline(rule, 3, params[rule])
            t0 = time.perf_counter()
            pipe(G)
            times[rule].append(time.perf_counter() - t0)
        if save:
            (PARTS / "timing.json").write_text(json.dumps(rows()))
    return rows()


# -- merge ------------------------------------------------------------------------------------
def summarize(runs: list[list]) -> list[dict]:
    acc: dict[tuple, list[float]] = {}
    for rule, f, attack, seed, params, split, a, wall in runs:
        acc.setdefault((rule, f, attack, params), []).append(a)
    return [{"table": "accuracy", "rule": r, "f": f, "attack": atk, "params": p, "accuracy": median(xs),
             "min": min(xs), "max": max(xs), "seeds": len(xs)} for (r, f, atk, p), xs in sorted(acc.items())]


def worst_cases(rows: list[dict], f: int) -> dict[str, dict]:
    """Per rule at f: the attack with the lowest median accuracy, and that row."""
    out = {}
    for r in {x["rule"] for x in rows if x.get("table") == "accuracy" and x["f"] == f}:
        cand = [x for x in rows if x.get("table") == "accuracy" and x["rule"] == r and x["f"] == f
                and x["attack"] != "none"]
        if cand:
            out[r] = min(cand, key=lambda x: (x["accuracy"], x["min"]))
    return out


def claims_of(rows: list[dict], fs: list[int]) -> list[dict]:
    out = []
    for f in fs:
        worst = worst_cases(rows, f)
        if "mean" not in worst or len(worst) < 2:
            continue
        best_rule = max((r for r in worst if r != "mean"), key=lambda r: (worst[r]["accuracy"], worst[r]["min"]))
        b, m = worst[best_rule], worst["mean"]
        out.append(claim(f"f={f}: best robust rule ({best_rule}) worst-case accuracy minus the mean's (points; "
                         f"best {100 * b['accuracy']:.1f} [{100 * b['min']:.1f}, {100 * b['max']:.1f}] under "
                         f"{b['attack']}, mean {100 * m['accuracy']:.1f} [{100 * m['min']:.1f}, {100 * m['max']:.1f}] "
                         f"under {m['attack']})", 100 * (b["accuracy"] - m["accuracy"]), ">= 20",
                         100 * (b["accuracy"] - m["accuracy"]) >= 20))
        for fl in ("flag", "flag_lam"):
            if fl not in worst:
                continue
            x = worst[fl]
            gap = 100 * (b["accuracy"] - x["accuracy"])
            out.append(claim(f"f={f}: {fl} worst case behind the best rule ({best_rule}) (points; {fl} "
                             f"{100 * x['accuracy']:.1f} [{100 * x['min']:.1f}, {100 * x['max']:.1f}] "
                             f"under {x['attack']}; "
                             f"within the spread: {fl}'s median >= the best rule's worst seed "
                             f"{100 * b['min']:.1f})", gap, "within the best rule's seed spread",
                             x["accuracy"] >= b["min"]))
    t = {r["rule"]: r for r in rows if r.get("table") == "aggregation_time"}
    if "flag" in t:
        out.append(claim(f"flag aggregation time, n=15, d={t['flag']['d']}, {t['flag'].get('threads', 1)} torch "
                         f"thread(s) (s; min {t['flag']['min_s']:.3f}, max "
                         f"{t['flag']['max_s']:.3f})", t["flag"]["aggregate_s"], "<= 1", t["flag"]["aggregate_s"] <= 1))
    return out


def heatmap(rows: list[dict], fs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atks = ["none", *ATTACKS]
    rules = [r for r in RULES if any(x.get("rule") == r for x in rows)]
    M = [[float("nan")] * len(atks) for _ in rules]
    for i, r in enumerate(rules):
        for j, a in enumerate(atks):
            xs = [x["accuracy"] for x in rows if x.get("table") == "accuracy" and x["rule"] == r and x["attack"] == a
                  and x["f"] in fs]
            if xs:
                M[i][j] = 100 * min(xs)
    fig, ax = plt.subplots(figsize=(11, 7))
    im = ax.imshow(M, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(atks)), atks, rotation=30, ha="right")
    ax.set_yticks(range(len(rules)), rules)
    for i in range(len(rules)):
        for j in range(len(atks)):
            if M[i][j] == M[i][j]:
                ax.text(j, i, f"{M[i][j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"digits (+shifts), n=15: test accuracy %, median of seeds, worst over f in {fs}")
    fig.colorbar(im, ax=ax, label="accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(name: str, fs: list[int]) -> Path:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json"))}
    runs = [r for k, p in parts.items() if k.startswith("grid") for r in p["runs"]]
    rows = summarize(runs)
    rows += [{"table": "tuning", **r} for r in parts.get("tune", {}).get("rows", [])]
    rows += [r for k, p in parts.items() if k.startswith("timing") for r in p["rows"]]
    claims = claims_of(rows, fs)
    heatmap(rows, [f for f in fs if f > 0], RESULTS / f"{name}.png")
    loads = [p.get("load") for p in parts.values() if p.get("load")]
    notes = (f"Accuracy: test split (2,485 examples), median [min, max] over {len(SEEDS)} seeds, {STEPS} steps, "
             f"n={N}; tuned on the validation split: {json.dumps(parts.get('tune', {}).get('best', {}))}. "
             f"Load average (before, after) per part: {loads}. Wall per part (s): "
             f"{ {k: round(p.get('wall_s', 0)) for k, p in parts.items()} }. Parts cut short by their time limit "
             f"(runs done / planned; seeds are the outer loop, so a cut part has fewer seeds): "
             f"{ {k: p['partial'] for k, p in parts.items() if 'wall_s' not in p and 'partial' in p} }. "
             f"Heat map: {name}.png. Where Flag trails the best rule (f = 5, IPM plain and adaptive): the f Byzantine "
             f"rows are one collinear block, a third of the rows; Flag weighs rows by how well an r-dimensional "
             f"subspace explains their directions, so the block earns a place in the subspace, where the "
             f"distance-based rules (CAF, SMEA, MDA) reject it by its distance from the rest.")
    return write(name, rows, claims, notes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["tune", "f3", "f5", "timing"])
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the timing part")
    args = ap.parse_args()
    if args.quick:
        global PARTS
        PARTS = RESULTS / "byzantine_quick_parts"
        PARTS.mkdir(parents=True, exist_ok=True)
        _init_worker()
        out = part_grid([0, 3], 1, 4, [0], ["mean", "median", "flag", "mda"], ["ipm", "alie_opt", "inf"])
        (PARTS / "grid_quick.json").write_text(json.dumps(out))
        (PARTS / "timing.json").write_text(json.dumps(part_timing(10_000, 1)))
        print(merge("byzantine_quick", [0, 3]))
        return
    PARTS.mkdir(parents=True, exist_ok=True)
    if args.merge:
        print(merge("byzantine", [0, 3, 5]))
        return
    load, t0 = os.getloadavg(), time.perf_counter()
    if args.part == "tune":
        out = part_tune(args.procs, STEPS)
    elif args.part == "timing":
        out = part_timing(10_000_000, 3, save=True, threads=args.threads)
    else:
        fs = [0, 3] if args.part == "f3" else [5]
        out = part_grid(fs, args.procs, STEPS, SEEDS, RULES, ATTACKS, "grid_" + args.part)
    out.update(load=[round(x, 2) for x in (*load, *os.getloadavg())], wall_s=time.perf_counter() - t0)
    name = "grid_" + args.part if args.part in ("f3", "f5") else args.part
    (PARTS / f"{name}.json").write_text(json.dumps(out))
    print(PARTS / f"{name}.json")


if __name__ == "__main__":
    main()
