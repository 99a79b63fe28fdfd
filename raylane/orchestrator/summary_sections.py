"""Per-strategy sections of the end-of-run summary, from the metrics the bar and W&B get.

`MetricTotals` keeps, for every logged key with a section here (one `/` in the name: per-rank and
per-layer keys are W&B's), how often it was logged, its sum, last, largest and smallest value; it is
plain lists so it rides in the summary's checkpointed state. `section_rows(totals)` turns them into
(label, line) rows, each only when its keys were logged: a strategy that writes other keys (or none)
simply gets no row, and a key that appears later gets its row without a change here.
"""

from __future__ import annotations

from typing import Any, Callable

PREFIXES = ("gc/", "robust/", "outer/", "lgreco/", "gnnpipe/", "deepspeed/", "engine/", "stragglers/", "eval/accuracy",
            "eval/test_accuracy")
N, SUM, LAST, MAX, MIN = range(5)


def tracked(key: str) -> bool:
    return key.count("/") == 1 and key.startswith(PREFIXES)


def record(totals: dict[str, list[float]], metrics: dict[str, Any]) -> None:
    """Fold one logged row into `totals` (key -> [n, sum, last, max, min])."""
    for key, value in metrics.items():
        if not tracked(key) or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            continue
        t = totals.get(key)
        if t is None:
            totals[key] = [1, float(value), float(value), float(value), float(value)]
        else:
            t[N], t[SUM], t[LAST], t[MAX], t[MIN] = t[N] + 1, t[SUM] + value, float(value), max(t[MAX], value), \
                min(t[MIN], value)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _stragglers_gc(t: dict[str, list[float]]) -> str | None:
    if "gc/stragglers" not in t:
        return None
    rounds, count = int(t["gc/stragglers"][N]), int(t["gc/stragglers"][SUM])
    viol = int(t["gc/violation"][SUM]) if "gc/violation" in t else 0
    wait = t["gc/wait_s"][SUM] if "gc/wait_s" in t else 0.0
    return (f"{count} stragglers in {rounds} rounds, not waited for; {viol} violation(s) (more stragglers than the "
            f"code tolerates: waited); {wait:.1f} s waited in all")


def _straggler_plan(t: dict[str, list[float]]) -> str | None:
    if "stragglers/delayed" not in t:
        return None
    steps = int(t["stragglers/delayed"][N])
    line = (f"stragglers: {int(t['stragglers/delayed'][SUM])} delayed worker-steps in {steps} steps, "
            f"{t['stragglers/delay_total_s'][SUM]:.1f} s injected (largest {t['stragglers/delay_s'][MAX]:.2f} s)")
    if "stragglers/wait_s" in t:
        line += f"; rounds waited {t['stragglers/wait_s'][SUM]:.1f} s on them"
    return line


def _rows(t: dict[str, list[float]], p: str, unit: str) -> str | None:
    if f"{p}/byzantine_rows" not in t:
        return None
    parts = [f"{int(t[f'{p}/byzantine_rows'][SUM])} Byzantine rows in {int(t[f'{p}/byzantine_rows'][N])} {unit}"]
    if f"{p}/dropped_rows" in t:
        parts.append(f"{int(t[f'{p}/dropped_rows'][SUM])} non-finite rows dropped (suspected Byzantine)")
    if f"{p}/cos_to_honest_mean" in t:
        parts.append(f"last aggregate's cosine to the honest mean {t[f'{p}/cos_to_honest_mean'][LAST]:.3f}")
    return ", ".join(parts)


def _robust(t: dict[str, list[float]]) -> str | None:
    return _rows(t, "robust", "steps")


def _outer(t: dict[str, list[float]]) -> str | None:
    """DiLoCo's robust outer sync (strategy.outer.aggregator): one row per replica and merge."""
    return _rows(t, "outer", "outer merges")


def _draco(t: dict[str, list[float]]) -> str | None:
    if "gc/disagreeing" not in t:
        return None
    return (f"{int(t['gc/disagreeing'][SUM])} outvoted copies in {int(t['gc/disagreeing'][N])} rounds "
            f"(most in one round: {int(t['gc/disagreeing'][MAX])}; per rank: gc/disagree/rank<i> in metrics.jsonl)")


def _accuracy(t: dict[str, list[float]]) -> str | None:
    parts = []
    if "eval/accuracy" in t:
        parts.append(f"final {t['eval/accuracy'][LAST]:.4f} (best {t['eval/accuracy'][MAX]:.4f})")
    if "eval/test_accuracy_at_best_val" in t:
        parts.append(f"test at the best validation {t['eval/test_accuracy_at_best_val'][LAST]:.4f}")
    return ", ".join(parts) or None


def _gnnpipe(t: dict[str, list[float]]) -> str | None:
    boundaries = [k for k in t if k.startswith("gnnpipe/boundary") and k.endswith("_bytes")]
    if not boundaries and "gnnpipe/stale_reads" not in t:
        return None
    parts = [f"{len(boundaries) + 1} stages"] if boundaries else []
    if boundaries:
        parts.append(f"{_bytes(sum(t[k][SUM] for k in boundaries))} across stage boundaries")
    if "gnnpipe/stale_reads" in t:
        parts.append(f"{int(t['gnnpipe/stale_reads'][SUM])} stale reads")
    if "gnnpipe/staleness_epochs" in t:
        s = t["gnnpipe/staleness_epochs"]
        parts.append(f"staleness {s[SUM] / s[N]:.2f} epochs on average (largest {s[MAX]:.2f})")
    return ", ".join(parts)


def _lgreco(t: dict[str, list[float]]) -> str | None:
    parts = []
    if "lgreco/compressed_layers" in t:
        parts.append(f"{int(t['lgreco/compressed_layers'][LAST])} layers compressed")
    if "lgreco/bytes_per_step_planned" in t:
        parts.append(f"{_bytes(t['lgreco/bytes_per_step_planned'][LAST])} per step planned")
    if "lgreco/bytes_chosen" in t and "lgreco/bytes_default" in t and t["lgreco/bytes_chosen"][LAST]:
        parts.append(f"{t['lgreco/bytes_default'][LAST] / t['lgreco/bytes_chosen'][LAST]:.2f}x fewer bytes than "
                     f"the default level, {int(t['lgreco/bytes_chosen'][N])} plan(s)")
    return ", ".join(parts) or None


def _deepspeed(t: dict[str, list[float]]) -> str | None:
    parts = []
    if "deepspeed/bytes_sent" in t:
        parts.append(f"DeepSpeed sent {_bytes(t['deepspeed/bytes_sent'][SUM])} (rank 0, estimated)")
    for key, words in (("engine/optimizer_state_bytes", "optimizer state"), ("engine/master_bytes", "fp32 masters")):
        if key in t:
            parts.append(f"{words} {_bytes(t[key][LAST])} per rank")
    if "engine/peak_rss_bytes" in t:
        parts.append(f"peak RSS {_bytes(t['engine/peak_rss_bytes'][MAX])}")
    return ", ".join(parts) or None


SECTIONS: list[tuple[str, Callable[[dict[str, list[float]]], str | None]]] = [
    ("accuracy", _accuracy), ("stragglers", _stragglers_gc), ("attacks", _robust), ("outer attacks", _outer),
    ("vote", _draco), ("stages", _gnnpipe),
    ("plan", _lgreco), ("replicas", _deepspeed)]


def section_rows(totals: dict[str, list[float]]) -> list[tuple[str, str]]:
    """The (label, line) rows of the sections whose metrics were logged."""
    rows = [(label, line) for label, build in SECTIONS if (line := build(totals))]
    plan = _straggler_plan(totals)
    return rows + ([("faults", plan)] if plan else [])


def section_dict(totals: dict[str, list[float]]) -> dict[str, str]:
    """The same rows for summary.yaml (a key per section; the straggler plan under `straggler_plan`)."""
    out = {label: line for label, build in SECTIONS if (line := build(totals))}
    plan = _straggler_plan(totals)
    return {**out, **({"straggler_plan": plan} if plan else {})}
