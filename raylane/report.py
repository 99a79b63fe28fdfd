"""A local report from metrics.jsonl alone, for users without W&B.

    python -m raylane.report RUN_DIR [RUN_DIR ...] [-o report.html]

Writes one self-contained HTML page: a summary table (one row per run) and one plot per
metric — loss vs step, loss vs bytes on the wire, step time, bytes per step — with one
line per run. A directory without metrics.jsonl is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import html
import io
import json
import sys
from pathlib import Path
from typing import Any

# (title, x key, y keys, x label, y label)
PLOTS = [
    ("Loss vs step", "step", ["train/loss", "eval/loss"], "step", "loss"),
    ("Loss vs bytes on the wire", "comm/bytes_total", ["train/loss", "eval/loss"], "bytes sent (all workers)", "loss"),
    ("Step time", "step", ["train/round_s"], "step", "seconds per step"),
    ("Bytes per step", "step", ["comm/bytes_sent"], "step", "bytes sent per step (all workers)"),
]


class ReportError(ValueError):
    pass


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"run_dir={str(run_dir)!r}: no metrics.jsonl there; pass a raylane run directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    total = 0
    for r in records:  # runs logged before comm/bytes_total existed: derive it
        if "comm/bytes_sent" in r and "comm/bytes_total" not in r:
            total += r["comm/bytes_sent"]
            r["comm/bytes_total"] = total
    return records


def run_names(run_dirs: list[Path]) -> list[str]:
    """Directory names, with parents added until they are unique."""
    paths = [d.resolve() for d in run_dirs]
    for depth in range(1, 8):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) for records with y_key; x carried forward from the latest record that had it."""
    xs, ys, last_x = [], [], None
    for r in records:
        if r.get(x_key) is not None:
            last_x = r[x_key]
        if r.get(y_key) is not None and last_x is not None:
            xs.append(last_x)
            ys.append(r[y_key])
    return xs, ys


def summarize(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    train = [r["train/loss"] for r in records if r.get("train/loss") is not None]
    evals = [r["eval/loss"] for r in records if r.get("eval/loss") is not None]
    steps = [r["step"] for r in records if "train/loss" in r]
    total = max((r.get("comm/bytes_total") or 0 for r in records), default=0)
    return {"run": name, "steps": max(steps, default=0), "first train loss": train[0] if train else None,
            "final train loss": train[-1] if train else None, "final eval loss": evals[-1] if evals else None,
            "bytes on the wire": total, "wall s": max((r.get("time_s", 0) for r in records), default=0)}


def _plot_svg(title: str, x_key: str, y_keys: list[str], xlabel: str, ylabel: str,
              runs: dict[str, list[dict[str, Any]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for y_key, style in zip(y_keys, ["-", "--", ":"]):
            xs, ys = series(records, x_key, y_key)
            if xs:
                ax.plot(xs, ys, style, color=color, marker="o" if len(xs) < 20 else None, markersize=3,
                        label=f"{name} {y_key}" if len(y_keys) > 1 else name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if "loss" not in ylabel:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, int) and v > 10_000:
            return f"{v:,}"
        return html.escape("-" if v is None else str(v))

    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(run_dirs: list[Path]) -> str:
    names = run_names(run_dirs)
    runs = {name: load_run(d) for name, d in zip(names, run_dirs)}
    plots = "".join(f'<figure class="plot" data-metric="{html.escape(t)}">{_plot_svg(t, x, ys, xl, yl, runs)}</figure>'
                    for t, x, ys, xl, yl in PLOTS)
    table = _table([summarize(n, r) for n, r in runs.items()])
    style = ("body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f4f4f4}"
             ".plots{display:grid;grid-template-columns:repeat(2,640px);gap:12px}figure{margin:0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>raylane report</title><style>{style}</style>"
            f"</head><body><h1>raylane report</h1><p>{len(runs)} run(s): {html.escape(', '.join(names))}</p>"
            f"<h2>Summary</h2>{table}<h2>Plots</h2><div class='plots'>{plots}</div></body></html>")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raylane.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    args = p.parse_args(argv)
    try:
        page = render(args.run_dirs)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output.write_text(page)
    print(f"wrote {args.output.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
