"""A local report from metrics.jsonl alone, for users without W&B.

    python -m raylane.report RUN_DIR [RUN_DIR ...] [-o report.html]

Writes one self-contained HTML page: a compact summary table (one row per run: its strategy
preset, final losses and accuracy, bytes, wall time, faults in words), a second table (the config
keys that differ between the runs, steps, first loss, throughput) and one plot per metric — loss
vs step, loss vs wall time, loss vs bytes on the wire, step time, bytes per step, and accuracy vs
step when a run logged eval/accuracy — with one line per run in a colour of its own (and, for an L-GreCo run, its plan: layers x steps, colour = bytes
per value) and the runs' faults, recoveries and resumes marked on the curves.
Numbers follow the summary's definitions (`orchestrator/summary.py`). Each step is shown once:
rows a resume or rollback superseded are dropped, and time is made monotonic, also for files
written before metrics.jsonl was rewritten on resume. Bad input (no metrics.jsonl, garbage in
it, an output that cannot be written) is a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from raylane.orchestrator.summary import FINAL_TRAIN_LOSS, final_train_loss

# (title, x key, y keys, x label, y label)
PLOTS = [
    ("Loss vs step", "step", ["train/loss", "eval/loss"], "step", "loss"),
    ("Loss vs wall time", "time_s", ["train/loss", "eval/loss"], "wall time (s, training clock)", "loss"),
    ("Loss vs bytes on the wire", "comm/bytes_total", ["train/loss", "eval/loss"], "bytes sent (all workers)", "loss"),
    ("Step time", "step", ["train/round_s"], "step", "seconds per step"),
    ("Bytes per step", "step", ["comm/bytes_sent"], "step", "bytes sent per step (all workers)"),
]
# shown only when a run logged it (a classification dataset)
ACCURACY_PLOT = ("Accuracy vs step", "step", ["eval/accuracy"], "step", "eval accuracy")
# the first table: what a reader compares across runs; the rest of a row goes in the second
COMPACT = ("run", "strategy", "final train loss", "final eval loss", "final accuracy", "bytes on the wire",
           "wall s", "faults")
# event -> (marker colour, line style, label) drawn on the curves
MARKERS = {"fault_injected": ("#d62728", "--", "fault injected"), "recovered": ("#2ca02c", ":", "recovered"),
           "resumed": ("#1f77b4", "-.", "resumed")}
IGNORED_KEYS = ("run.", "logging.")  # differ between runs without changing what is trained


class ReportError(ValueError):
    pass


def _parse(path: Path) -> list[dict[str, Any]]:
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    if not lines:
        raise ReportError(f"{path}: empty, nothing to plot (has the run logged a step yet?)")
    records = []
    for i, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            if i == lines[-1][0] and records:
                continue  # a line torn by a crash mid-write
            raise ReportError(f"{path}:{i}: not a JSON line; is this a raylane metrics.jsonl?") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(f"{path}:{i}: a metrics line must be a JSON object with an integer 'step'")
        records.append(record)
    return records


def supersede(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each step once, time monotonic: a resume (or rollback) to step k drops the earlier metric
    rows after k; time that restarted at a resume continues from the last time seen."""
    out: list[dict[str, Any]] = []
    offset, last_t = 0.0, 0.0
    for r in records:
        r = dict(r)
        back = r.get("from_step") if r.get("event") == "resumed" else r.get("to_step")
        if r.get("event") in ("resumed", "rewound") and back is not None:
            out = [x for x in out if "event" in x or x["step"] <= back]
        if r.get("time_s") is not None:
            if r["time_s"] + offset < last_t - 1e-6 and r.get("event") == "resumed":
                offset = last_t - r["time_s"]
            r["time_s"] = r["time_s"] + offset
            last_t = max(last_t, r["time_s"])
        out.append(r)
    return out


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"run_dir={str(run_dir)!r}: no metrics.jsonl there; pass a raylane run directory")
    records = supersede(_parse(path))
    if not any("event" not in r for r in records):
        raise ReportError(f"{path}: no metric rows yet, nothing to plot")
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
    """(x, y) for metric rows with y_key; x carried forward from the latest record that had it."""
    xs, ys, last_x = [], [], None
    for r in records:
        if r.get(x_key) is not None:
            last_x = r[x_key]
        if "event" not in r and r.get(y_key) is not None and last_x is not None:
            xs.append(last_x)
            ys.append(r[y_key])
    return xs, ys


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose value is not the same in every run (what tells the runs apart)."""
    flats = [_flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f if not k.startswith(IGNORED_KEYS)})
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1] if len(flats) > 1 else []


def summarize(name: str, records: list[dict[str, Any]], run_dir: Path | None = None,
              keys: list[str] | None = None) -> dict[str, Any]:
    train = [r["train/loss"] for r in records if r.get("train/loss") is not None and "event" not in r]
    evals = [r["eval/loss"] for r in records if r.get("eval/loss") is not None and "event" not in r]
    steps = [r["step"] for r in records if "train/loss" in r]
    config = _flat(_yaml(run_dir / "config.yaml")) if run_dir else {}
    summary = _yaml(run_dir / "summary.yaml") if run_dir else {}
    accuracy = [r["eval/accuracy"] for r in records if r.get("eval/accuracy") is not None and "event" not in r]
    row: dict[str, Any] = {"run": name, "strategy": preset_name(config)}
    row.update({k: config.get(k, "-") for k in keys or []})
    row.update({"steps": max(steps, default=0), "first train loss": train[0] if train else None,
                "final train loss": final_train_loss(train), "final eval loss": evals[-1] if evals else None,
                "final accuracy": accuracy[-1] if accuracy else None,
                "bytes on the wire": max((r.get("comm/bytes_total") or 0 for r in records), default=0),
                "wall s": max((r.get("time_s") or 0.0 for r in records), default=0.0),
                f"{summary.get('throughput_unit', 'tokens')}/s": summary.get("tokens_per_s"),
                "faults": faults_in_words(records)})
    return row


def _one_throughput_column(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of token and of sample data side by side: one "tokens or samples/s" column."""
    keys = {k for r in rows for k in r if k in ("tokens/s", "samples/s")}
    if len(keys) < 2:
        return rows
    return [{("tokens or samples/s" if k in keys else k): v for k, v in r.items()} for r in rows]


def preset_name(config: dict[str, Any]) -> str:
    """The strategy as the user chose it: Streaming DiLoCo is `diloco` with fragments > 1."""
    name = config.get("strategy.name", "-")
    if name == "diloco" and (config.get("strategy.fragments") or 1) > 1:
        return "streaming_diloco"
    if name == "gradient_coding" and config.get("strategy.scheme") not in (None, "-"):
        return f"gradient_coding ({config['strategy.scheme']})"
    return name


def faults_in_words(records: list[dict[str, Any]]) -> str:
    """The injected faults as short words ("crash w1@20, straggler@1"), "none" without any."""
    words = []
    for r in records:
        if r.get("event") == "fault_injected":
            who = f" w{r['rank']}" if r.get("rank") is not None else ""
            words.append(f"{r.get('kind', '?')}{who}@{r['step']}")
    recovered = sum(1 for r in records if r.get("event") == "recovered")
    shown = ", ".join(words[:4]) + (f" +{len(words) - 4} more" if len(words) > 4 else "")
    return (shown + (f"; {recovered} recovered" if recovered else "")) if words else "none"


def run_colors(n: int) -> list[Any]:
    """n colours, all distinct: tab10 up to 10 runs, tab20 up to 20, then evenly spaced on turbo."""
    import matplotlib

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = matplotlib.colormaps["tab20" if n <= 20 else "turbo"]
    return [cmap(i) if n <= 20 else cmap(i / (n - 1)) for i in range(n)]


def _markers(ax: Any, records: list[dict[str, Any]], x_key: str, seen: set[str]) -> None:
    if x_key not in ("step", "time_s"):
        return
    for r in records:
        style = MARKERS.get(r.get("event", ""))
        if style is not None and r.get(x_key) is not None:
            label = None if style[2] in seen else style[2]
            seen.add(style[2])
            ax.axvline(r[x_key], color=style[0], linestyle=style[1], linewidth=1, alpha=0.7, label=label)


def _plot_svg(title: str, x_key: str, y_keys: list[str], xlabel: str, ylabel: str,
              runs: dict[str, list[dict[str, Any]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=100)
    seen: set[str] = set()
    for color, (name, records) in zip(run_colors(len(runs)), runs.items()):
        for y_key, style in zip(y_keys, ["-", "--", ":"]):
            xs, ys = series(records, x_key, y_key)
            if xs:
                ax.plot(xs, ys, style, color=color, marker="o" if len(xs) < 20 else None, markersize=3,
                        label=f"{name} {y_key}" if len(y_keys) > 1 else name)
        _markers(ax, records, x_key, seen)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if "bytes" in xlabel:
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    if "bytes" in ylabel:
        ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
    if "loss" not in ylabel:
        ax.set_ylim(bottom=0, top=1.0 if "accuracy" in ylabel else None)
    ax.grid(alpha=0.3)
    if ax.lines:  # beside the axes, never over the data
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plan_grid(records: list[dict[str, Any]]) -> tuple[list[str], list[int], list[list[float]]]:
    """L-GreCo's plans (`lgreco/plan/<layer>/bytes_per_value`, logged at each (re)plan) as layers x
    steps: each plan holds from its step until the next; ([], [], []) for a run without plans."""
    prefix, suffix = "lgreco/plan/", "/bytes_per_value"
    plans = [(r["step"], {k[len(prefix):-len(suffix)]: v for k, v in r.items()
                          if k.startswith(prefix) and k.endswith(suffix) and v is not None})
             for r in records if "event" not in r and any(k.startswith(prefix) for k in r)]
    plans = [(step, plan) for step, plan in plans if plan]
    if not plans:
        return [], [], []
    layers = list(dict.fromkeys(k for _, plan in plans for k in plan))
    last = max([r["step"] for r in records if "event" not in r] + [plans[-1][0]])
    steps = list(range(plans[0][0], last + 1))
    grid, current, i = [[float("nan")] * len(steps) for _ in layers], {}, 0
    for col, step in enumerate(steps):
        while i < len(plans) and plans[i][0] <= step:
            current.update(plans[i][1])
            i += 1
        for row, layer in enumerate(layers):
            grid[row][col] = current.get(layer, float("nan"))
    return layers, steps, grid


def plan_figure(name: str, records: list[dict[str, Any]]) -> str:
    """An SVG figure of a run's L-GreCo plan (layers x steps, colour = bytes per value, log scale);
    "" for a run without one."""
    layers, steps, grid = plan_grid(records)
    if not layers:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.22 * len(layers)), dpi=100)
    edges = [steps[0] - 0.5 + j for j in range(len(steps) + 1)]
    values = [v for row in grid for v in row if v == v and v > 0]
    mesh = ax.pcolormesh(edges, range(len(layers) + 1), grid, cmap="viridis", shading="flat",
                         norm=LogNorm(vmin=min(values), vmax=max(values)) if values else None)
    ax.set_yticks([i + 0.5 for i in range(len(layers))], labels=layers, fontsize=7)
    ax.invert_yaxis()
    ax.set(title=f"L-GreCo plan: {name}", xlabel="step")
    fig.colorbar(mesh, ax=ax, label="bytes per value (fp32: 4)")
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return f'<figure class="plot" data-metric="lgreco plan {html.escape(name)}">{buf.getvalue()}</figure>'


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape("-" if v is None else str(v).lower())
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def table_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(run_dirs: list[Path], title: str = "raylane report", extra_html: str = "") -> str:
    names = run_names(run_dirs)
    runs = {name: load_run(d) for name, d in zip(names, run_dirs)}
    keys = differing_keys([_yaml(d / "config.yaml") for d in run_dirs])
    classification = any(r.get("eval/accuracy") is not None for records in runs.values() for r in records)
    plots = "".join(f'<figure class="plot" data-metric="{html.escape(t)}">{_plot_svg(t, x, ys, xl, yl, runs)}</figure>'
                    for t, x, ys, xl, yl in PLOTS + ([ACCURACY_PLOT] if classification else []))
    plots += "".join(plan_figure(name, records) for name, records in runs.items())
    rows = _one_throughput_column([summarize(n, r, d, keys) for (n, r), d in zip(runs.items(), run_dirs)])
    compact = [c for c in COMPACT if c != "final accuracy" or classification]
    table = table_html([{c: r[c] for c in compact} for r in rows])
    table += "<h3>Config differences and details</h3>" + table_html(
        [{k: v for k, v in r.items() if k == "run" or k not in compact} for r in rows])
    style = ("body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f4f4f4}"
             ".plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(720px,1fr));gap:12px}"
             "figure{margin:0}figure svg{max-width:100%;height:auto}.note{color:#555;font-size:90%}")
    note = (f"final train loss: {FINAL_TRAIN_LOSS}; wall s: the training clock over every session of the run; "
            "faults: kind, worker (w) and step of each injected fault; "
            "tokens/s (samples/s for non-token data): tokens (samples) of the steps kept / wall time (from summary.yaml, once "
            "the run finished); the second table: the config keys that differ between the runs, then the rest. "
            "Markers: fault injected (red dashed), recovered (green dotted), resumed (blue dash-dot).")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(runs)} run(s): {html.escape(', '.join(names))}</p>{extra_html}"
            f"<h2>Summary</h2>{table}<p class='note'>{html.escape(note)}</p>"
            f"<h2>Plots</h2><div class='plots'>{plots}</div></body></html>")


def write(page: str, output: Path) -> None:
    try:
        output.write_text(page)
    except OSError as e:
        raise ReportError(f"-o {str(output)!r}: cannot write there ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raylane.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    args = p.parse_args(argv)
    try:
        write(render(args.run_dirs), args.output)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
