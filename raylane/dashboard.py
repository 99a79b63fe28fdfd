"""The project's W&B dashboard: a saved workspace with the panels a raylane user reads.

    python -m raylane.dashboard --entity ENTITY [--project raylane] [--save]

Without `--save` it prints the workspace it would create (no server needed); with
`--save` it saves it to W&B (needs WANDB_API_KEY) and prints its URL. Panels read the
metric names raylane logs (train/, eval/, comm/, faults/, stragglers/ prefixes).
"""

from __future__ import annotations

import argparse
import sys

# (section, [(title, x, [y...])])
LAYOUT = [
    ("Loss", [("loss vs step", "Step", ["train/loss", "eval/loss"]),
              ("loss vs bytes on the wire", "comm/bytes_total", ["train/loss", "eval/loss"])]),
    ("Communication", [("bytes per step (all workers)", "Step", ["comm/bytes_sent"]),
                       ("bytes per step per worker", "Step", ["comm/bytes_sent_per_worker"]),
                       ("time waiting on collectives", "Step", ["comm/wait_s"])]),
    ("Speed", [("step time", "Step", ["train/step_time_s", "train/round_s"]),
               ("throughput", "Step", ["train/tokens_per_s"])]),
    ("Stragglers", [("straggler wait", "Step", ["stragglers/wait_s"]),
                    ("stragglers tolerated", "Step", ["stragglers/tolerated"]),
                    ("straggler delays injected", "Step", ["stragglers/delay_s", "stragglers/delayed"])]),
    ("Faults", [("fault events", "Step", ["faults/events"]),
                ("time to recover", "Step", ["faults/recovery_s"])]),
]


def build_workspace(entity: str, project: str, name: str = "raylane"):
    """The workspace object (nothing is sent anywhere until `.save()`)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = [ws.Section(name=section, is_open=True,
                           panels=[wr.LinePlot(title=title, x=x, y=list(ys)) for title, x, ys in plots])
                for section, plots in LAYOUT]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        runset_settings=ws.RunsetSettings(groupby=[ws.Config("strategy.name")]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raylane.dashboard", description=__doc__.split("\n\n")[0])
    p.add_argument("--entity", required=True)
    p.add_argument("--project", default="raylane")
    p.add_argument("--name", default="raylane")
    p.add_argument("--save", action="store_true", help="save the workspace to W&B (needs WANDB_API_KEY)")
    args = p.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.name)
    for section in workspace.sections:
        print(f"{section.name}: " + ", ".join(panel.title for panel in section.panels))
    if args.save:
        saved = workspace.save()
        print(f"saved: {saved.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
