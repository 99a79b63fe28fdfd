"""`python -m raylane.plan [--link-gbps G] [--latency-s L] [key=value ...]`: will DiLoCo pay on this link?

Runs a few ddp steps of the given config (same model, data and workers; on the cluster train would
use) to measure compute time per step and ddp's traffic per step, then predicts with
`raylane.walltime` the time per step and the bytes of ddp, DiLoCo (H in SYNC_EVERY, fp32 outer
gradients) and Streaming DiLoCo (P fragments, tau = 1, fp4 e3m0) on a link of the given bandwidth and
latency, and the H it would pick: the smallest whose unhidden communication stays within
`--max-comm-share` of a step (a smaller H keeps the loss closer to ddp's: see
benchmarks/results/diloco_map.md for how much closer at which model size and replica count).
Time-to-target = steps-to-target x time per step; the table gives time per step at equal tokens.
A calibration too short to measure is refused (one line, exit 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from raylane.comm import CompressionConfig, Link, expected_bytes_sent
from raylane.comm.wire import Traffic
from raylane.validation import ConfigError
from raylane.walltime import System, comm_share, pick_sync_every, step_time_s

SYNC_EVERY = [1, 10, 50, 100]
WARMUP_STEPS = 2  # compile and first-touch steps, left out of the timing
MIN_TIMED_STEPS = 8
STREAMING_FP4 = CompressionConfig(name="fp4", block_size=128, format="e3m0", stochastic=False)


@dataclass(frozen=True)
class Calibration:
    """What a short ddp run measured: compute per step, ddp's traffic per step (rank 0), model size."""

    compute_s: float
    ddp_traffic: Traffic
    num_params: int
    world: int
    timed_steps: int


def check_calibration_steps(steps: int) -> None:
    if steps < WARMUP_STEPS + MIN_TIMED_STEPS:
        raise ConfigError(f"--calibration-steps={steps}: too short to measure; needs at least "
                          f"{WARMUP_STEPS + MIN_TIMED_STEPS} (the first {WARMUP_STEPS} are warm-up, left out)")


def calibration_from(round_s: list[float], comm: dict[str, Any], num_params: int, world: int) -> Calibration:
    """A Calibration from a ddp run's per-step round times and rank 0's comm stats (`CommStats.as_dict`)."""
    timed = round_s[WARMUP_STEPS:]
    if len(timed) < MIN_TIMED_STEPS:
        raise ConfigError(f"calibration: {len(timed)} timed steps; needs at least {MIN_TIMED_STEPS}")
    steps = len(round_s)
    ops = comm["ops"].values()
    traffic = Traffic(sum(o["bytes_sent"] for o in ops) // steps, sum(o["bytes_recv"] for o in ops) // steps,
                      sum(o["messages_sent"] for o in ops) // steps, sum(o["messages_recv"] for o in ops) // steps)
    compute = max(1e-6, statistics.median(timed) - comm["comm_wait_s"] / steps)
    return Calibration(compute, traffic, num_params, world, len(timed))


def outer_traffic(numel: int, world: int, compression: CompressionConfig) -> Traffic:
    """One DiLoCo outer sync of `numel` values: the quantized all-reduce's bytes (the Communicator's formula);
    messages: an all-to-all and an all-gather, (W-1) each."""
    sent = expected_bytes_sent("quantized_allreduce", (numel,), torch.float32, world,
                               compressor=compression.build())
    return Traffic(sent, sent, 2 * (world - 1), 2 * (world - 1))


def systems(cal: Calibration, fragments: int) -> dict[str, Any]:
    """ddp, then a maker per DiLoCo family: H -> System."""
    def diloco(h: int) -> System:
        return System(f"diloco H={h}", h, 1, 0, outer_traffic(cal.num_params, cal.world, CompressionConfig()))

    def streaming(h: int) -> System:
        p = min(fragments, h)  # tau = 1 where it fits (tau < H)
        return System(f"streaming diloco H={h} P={p} fp4", h, p, min(1, h - 1),
                      outer_traffic(-(-cal.num_params // p), cal.world, STREAMING_FP4))

    return {"ddp": System("ddp", 1, 1, 0, cal.ddp_traffic), "diloco": diloco, "streaming": streaming}


def table(cal: Calibration, link: Link, fragments: int, max_share: float) -> str:
    built = systems(cal, fragments)
    ddp_step = step_time_s(built["ddp"], cal.compute_s, link)
    lines = [f"calibration: {cal.timed_steps} timed ddp steps, compute {cal.compute_s * 1e3:.1f} ms/step, "
             f"{cal.num_params:,} parameters, {cal.world} workers",
             f"link: {link.bandwidth_gbps * 1e3:g} Mbit/s, {link.latency_s * 1e3:g} ms per message", "",
             f"{'system':<32} {'s/step':>9} {'vs ddp':>7} {'comm share':>10} {'bytes/step':>12}"]

    def row(s: System) -> str:
        t = step_time_s(s, cal.compute_s, link)
        return (f"{s.name:<32} {t:>9.4f} {ddp_step / t:>6.2f}x {comm_share(s, cal.compute_s, link):>10.1%} "
                f"{s.bytes_per_step():>12,.0f}")

    lines.append(row(built["ddp"]))
    for family in ("diloco", "streaming"):
        lines += [row(built[family](h)) for h in SYNC_EVERY]
    picks = {f: pick_sync_every(built[f], SYNC_EVERY, cal.compute_s, link, max_share) for f in ("diloco", "streaming")}
    lines += ["", f"pick: DiLoCo H={picks['diloco']}, Streaming DiLoCo H={picks['streaming']} (the smallest H whose "
              f"unhidden communication is <= {max_share:.0%} of a step); time-to-target = steps-to-target x s/step"]
    return "\n".join(lines)


def calibrate(overrides: list[str], steps: int) -> Calibration:
    """A ddp run of `steps` steps of the config (no eval, no checkpoints) on the cluster train would use;
    the config's own strategy, step count, logging and run keys are replaced."""
    from raylane import config
    from raylane.orchestrator.coordinator import Coordinator
    from raylane.train import connect_ray

    own = ("strategy", "train.steps", "train.eval_every", "checkpoint.every", "logging", "resume", "run.")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(own)]
    with tempfile.TemporaryDirectory() as root:
        cfg = config.load([*kept, "strategy=ddp", f"train.steps={steps}", "train.eval_every=0",
                           "checkpoint.every=0", "logging=quiet", "resume=false", f"run.root={root}",
                           "run.name=plan-calibration"])
        import ray

        connect_ray(cfg.cluster)
        coord = Coordinator(cfg)
        try:
            coord.train()
            comm = coord.group.get(coord.group.call("comm_stats"))[0]
            numel = coord.group.get(coord.group.call("flat_parameters"))[0].numel()
        finally:
            coord.close()
            ray.shutdown()
        import json

        lines = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
        round_s = [x["train/round_s"] for x in lines if "train/round_s" in x]
        return calibration_from(round_s, comm, numel, cfg.cluster.num_workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raylane.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--link-gbps", type=float, default=0.1, help="link bandwidth, Gbit/s (default 0.1)")
    p.add_argument("--latency-s", type=float, default=0.001, help="latency per message, s (default 0.001)")
    p.add_argument("--calibration-steps", type=int, default=20)
    p.add_argument("--fragments", type=int, default=4, help="Streaming DiLoCo's P (capped at H)")
    p.add_argument("--max-comm-share", type=float, default=0.1)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the run to plan, as for raylane.train")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for key in ("link_gbps", "latency_s", "max_comm_share"):
            if getattr(args, key) < 0 or (key == "link_gbps" and args.link_gbps == 0):
                raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)}: must be > 0")
        check_calibration_steps(args.calibration_steps)
        cal = calibrate(args.overrides, args.calibration_steps)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(cal, Link(args.link_gbps, args.latency_s), args.fragments, args.max_comm_share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
