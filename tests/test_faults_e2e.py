"""The fault presets end to end on the local Ray cluster: `faults=byzantine` and `faults=network_100mbit`
train to completion, and what they did shows in metrics.jsonl: the byzantine worker's event and the
point where the losses leave a fault-free run's; the emulated link's time, from the counted bytes."""

import json
import statistics

import pytest
import torch

from raylane.comm import Link, wire
from tests.conftest import FAULT_FREE, small_cfg, train_and_collect

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]


def _records(cfg, coord, params):
    """(steps done, flat parameters of rank 0, metric records by step, event records) of a finished run."""
    lines = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
    steps = {x["step"]: x for x in lines if "train/loss" in x}
    return coord.step, params[0], steps, [x for x in lines if "event" in x]


def _run(cfg):
    """Train to the end; its `_records`."""
    return _records(cfg, *train_and_collect(cfg))


def test_byzantine_preset_fires_on_rank_3_at_step_10_and_changes_training_from_there(fault_free_run, tmp_path):
    """The preset sign-flips rank 3's outgoing tensors from step 10: steps 1-10 (whose losses are
    computed before step 10's update) match a fault-free run exactly, step 11 on do not."""
    base = _records(*fault_free_run)  # 12 steps of 4 workers, the session's fault-free run
    step, params, steps, events = _run(small_cfg(tmp_path, *FAULT_FREE, "faults=byzantine", "run.name=byz"))
    assert step == base[0] == 12 and sorted(steps) == list(range(1, 13))
    assert (tmp_path / "byz" / "summary.yaml").is_file()
    fired = [e for e in events if e["event"] == "fault_injected"]
    assert [(e["step"], e["kind"], e["rank"]) for e in fired] == [(10, "byzantine", 3)]
    clean = base[2]
    assert [steps[s]["train/loss"] for s in range(1, 11)] == [clean[s]["train/loss"] for s in range(1, 11)]
    assert all(steps[s]["train/loss"] != clean[s]["train/loss"] for s in (11, 12))
    assert not torch.equal(params, base[1])
    assert all(steps[s]["comm/bytes_sent"] == clean[s]["comm/bytes_sent"] for s in steps)  # same collectives


def test_network_preset_slows_each_step_by_the_link_time_of_its_counted_bytes(ray_cluster, tmp_path):
    """100 Mbit/s and 1 ms per message: each rank's one gradient allreduce per step waits
    bytes·8/bandwidth + latency·messages more than on loopback; bytes are unchanged."""
    common = ["train.steps=12", "cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "model.d_model=64",
              "model.n_layer=2", "faults.detect_outliers=false"]
    _, params, clean, _ = _run(small_cfg(tmp_path, *common, "run.name=loopback"))
    step, _, slow, _ = _run(small_cfg(tmp_path, *common, "faults=network_100mbit", "run.name=link"))
    assert step == 12 and sorted(slow) == list(range(1, 13))
    traffic = [wire.gloo_allreduce(params.numel() * 4, 4, 2, r) for r in range(2)]
    for s in slow:  # the counted bytes are one fp32 gradient allreduce per rank, in both runs
        assert [slow[s][f"comm/bytes_sent/rank{r}"] for r in range(2)] == [t.bytes_sent for t in traffic]
        assert slow[s]["comm/bytes_sent"] == clean[s]["comm/bytes_sent"]
    link = Link(bandwidth_gbps=0.1, latency_s=0.001)  # configs/faults/network_100mbit.yaml
    delay = max(link.delay_s(t) for t in traffic)
    assert delay > 0.03  # the link dominates this model's compute: the test can see it

    def median(rows, key):
        return statistics.median(rows[s][key] for s in rows if s > 1)  # step 1 warms up

    assert median(slow, "comm/wait_s") >= 0.9 * delay
    added = median(slow, "train/step_time_s") - median(clean, "train/step_time_s")
    assert 0.5 * delay <= added <= delay + 0.3, (added, delay)
