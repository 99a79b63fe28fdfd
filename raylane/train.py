"""Entry point: `python -m raylane.train [-m] [key=value ...]` (also `raylane-train`).

Composes configs/ with the Hydra overrides given, validates every job's config before
anything starts (a user error is one line on stderr and exit code 2; no Ray actor is
started), connects to Ray — the cluster in $RAY_ADDRESS or `cluster.address` (a
`ray job submit` sets it), otherwise a local one on loopback — and hands each job to
the Coordinator. `-m` runs a sweep (`-m seed=1,2 optim.lr=1e-3,3e-3`): its jobs run
one after another, each in its own run directory named after its sweep values.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from raylane import config, ray_connect
from raylane.validation import ConfigError

log = logging.getLogger("raylane")

EXIT_USER_ERROR = 2


def presets_help() -> str:
    """The config groups and their presets (configs/<group>/*.yaml), for --help."""
    lines = ["presets (choose with GROUP=NAME, e.g. strategy=m_sgc faults=crash):"]
    for group in (*config.GROUPS, "compression"):
        names = sorted(p.stem for p in (config.config_dir() / group).glob("*.yaml"))
        key = "+compression@strategy.compression" if group == "compression" else group
        lines.append(f"  {key:<34} {' '.join(names)}")
    lines += ["every key: python -m raylane.train --cfg job; worker logs: Ray's session logs "
              "(/tmp/ray/session_latest/logs/worker-*.err), errors are repeated on this console"]
    return "\n".join(lines)


def setup_logging() -> None:
    """INFO lines through the progress bar's writer (never glued onto the bar); one format for every CLI."""
    from raylane.orchestrator.metrics import BarLogHandler

    handler = BarLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raylane-train", description=__doc__.split("\n\n")[0],
                                epilog=presets_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--multirun", action="store_true", help="run every combination of swept values")
    p.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=ddp cluster.num_workers=2")
    return p.parse_args(argv)


def expand_sweeps(overrides: list[str]) -> list[tuple[list[str], str]]:
    """Every combination of swept values: (overrides, tag naming the swept values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            axes.append([(f"{key}={v}", f"{key.lstrip('+')}={v}") for v in ov.sweep_string_iterator()])
        else:
            axes.append([(ov.input_line, None)])
    jobs = []
    for combo in itertools.product(*axes):
        tag = ",".join(t for _, t in combo if t)
        jobs.append(([o for o, _ in combo], tag))
    return jobs


def build_jobs(overrides: list[str], multirun: bool) -> list[Any]:
    """Validated RunConfigs, one per job. Raises ConfigError."""
    if not multirun:
        return [config.load(overrides)]
    jobs = []
    for job_overrides, tag in expand_sweeps(overrides):
        raw = config.compose(job_overrides)
        names_run = any(o.lstrip("+").startswith(("run.name=", "run.dir=")) for o in job_overrides)
        raw["logging"]["group"] = raw["logging"]["group"] or raw["run"]["name"]  # one W&B group per sweep
        if tag and not names_run:
            raw["run"]["name"] = f"{raw['run']['name']}__{tag.replace('/', '_')}"
        jobs.append(config.validate(raw))
    return jobs


def connect_ray(cluster: Any) -> bool:
    """Connect to the configured cluster, or start a local one. True when all runs on loopback.

    A local cluster gets a fresh token of its own in the environment (ray 2.60 turns token
    auth on by default): nothing is written to ~/.ray/auth_token, so no stale token is left
    behind to break a later `ray start` + `ray job submit`.
    """
    import ray

    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        key = "cluster.address" if cluster.address else "RAY_ADDRESS"
        try:
            ray_connect.attach(address, key, cluster.connect_timeout_s)  # bounded: never waits forever
        except ray.exceptions.AuthenticationError as e:
            raise ConfigError(f"cluster.address={address!r}: the cluster refused this auth token ({_first(e)}); "
                              "use the head's token: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or "
                              "~/.ray/auth_token as on the head (`ray get-auth-token`)") from None
        nodes = [n for n in ray.nodes() if n["Alive"]]
        return len(nodes) == 1 and nodes[0]["NodeManagerAddress"] in ("127.0.0.1", "localhost")
    start_local_ray(max(os.cpu_count() or 1, int(cluster.num_workers * cluster.cpus_per_worker + 0.999)))
    return True


def start_local_ray(num_cpus: int) -> None:
    """An embedded Ray on loopback, with an ephemeral auth token kept in this process's environment."""
    import ray

    if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # ray.init turns token mode on itself
    # ... and says so on every run ("Token authentication is enabled"): that is raylane's choice, not news
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    for attempt in (1, 2):  # a raw start failure ("Failed to register worker to Raylet", ~1 in 35) is retried once
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     _node_ip_address="127.0.0.1")  # "local": never attach to another `ray start` on this machine
            return
        except Exception as e:  # noqa: BLE001 - Ray raises several types here; all mean "did not start"
            ray.shutdown()
            if attempt == 2:
                raise RayStartError(f"the embedded Ray cluster did not start, twice: {_first(e)} (Ray's logs: "
                                    "/tmp/ray/session_latest/logs)") from None
            log.warning("the embedded Ray cluster did not start (%s); trying once more", _first(e))


class RayStartError(RuntimeError):
    """The embedded Ray did not start, on both tries: one line on stderr, exit code 1."""


def _first(e: Exception) -> str:
    return str(e).strip().split("\n")[0]


def run_jobs(jobs: list[Any]) -> int:
    import ray

    from raylane.orchestrator.checkpoint import CheckpointError
    from raylane.orchestrator.coordinator import RunFailed, run
    from raylane.orchestrator.worker_group import WorkerStartError

    loopback = connect_ray(jobs[0].cluster)
    done: list[tuple[Any, Any]] = []
    try:
        if len(jobs) > 1:
            print(f"sweep: {len(jobs)} runs, one after another: " + ", ".join(c.run.name for c in jobs), flush=True)
        for i, cfg in enumerate(jobs, 1):
            log.info("run %s%s -> %s", f"{i}/{len(jobs)} " if len(jobs) > 1 else "", cfg.run.name, cfg.run.path())
            summary = run(cfg, loopback)
            done.append((cfg, summary))
            print(summary.table(), flush=True)
            print(f"run dir: {cfg.run.path()}", flush=True)
            if cfg.logging.wandb_mode == "offline":
                print(wandb_sync_hint(cfg.run.path() / "wandb"))
        if len(jobs) > 1:
            print(sweep_table(done), flush=True)
    except (WorkerStartError, RunFailed, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


def wandb_sync_hint(folder: Path) -> str:
    """How to upload an offline run: one folder per session of a resumed run, the later ones appended."""
    sessions = sorted(folder.glob("offline-run-*"))
    if len(sessions) <= 1:
        return f"W&B (offline): upload with `wandb sync {folder}/offline-run-*`"
    later = " ".join(str(p) for p in sessions[1:])
    return (f"W&B (offline, {len(sessions)} sessions of one run): upload with `wandb sync {sessions[0]}` "
            f"then `wandb sync --append {later}`")


def sweep_table(done: list[tuple[Any, Any]]) -> str:
    """The sweep's closing table: a row per run with its final losses and wall time."""
    width = max(len(c.run.name) for c, _ in done)

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = ["", f"{'sweep run':<{width}}  {'final train':>11}  {'final eval':>10}  {'wall s':>8}"]
    lines += [f"{c.run.name:<{width}}  {num(s.train_loss):>11}  {num(s.eval_loss):>10}  {s.wall_s:>8.1f}"
              for c, s in done]
    return "\n".join(lines)


EXIT_INTERRUPTED = 130


def _connect_and_run(jobs: list[Any]) -> int:
    from raylane.orchestrator.coordinator import Interrupted

    try:
        return run_jobs(jobs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RayStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\nstopped before the first step", file=sys.stderr)
        return EXIT_INTERRUPTED


def shown_config(cfg: Any) -> dict[str, Any]:
    """What `--cfg job` prints: the run's config without the keys its model and data set never read,
    and with the run dir it will write to (null meant <root>/<name>)."""
    from raylane.workers.data import UNUSED
    from raylane.workers.models import USES

    shown = cfg.to_dict()
    shown["model"] = {k: v for k, v in shown["model"].items() if k == "name" or k in USES[cfg.model.name]}
    shown["data"] = {k: v for k, v in shown["data"].items() if k not in UNUSED[cfg.data.name]}
    shown["run"]["dir"] = str(cfg.run.path())
    return shown


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        jobs = build_jobs(args.overrides, args.multirun)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.cfg:
        import yaml

        for cfg in jobs:
            print(yaml.safe_dump(shown_config(cfg), sort_keys=False))
        return 0
    return _connect_and_run(jobs)


if __name__ == "__main__":
    sys.exit(main())
