"""DiLoCo's robust outer sync (strategy.outer.aggregator): the replicas' outer gradients gathered and
aggregated by a robust rule. No Ray: TrainWorkers joined by Gloo in threads."""

from __future__ import annotations

import pytest
import torch

from raylane.validation import ConfigError
from raylane.workers.chaos import ByzantineStep
from tests.conftest import small_cfg
from tests.multiproc import run_workers_in_threads

STREAMING = ["strategy=streaming_diloco", "model.n_layer=2", "strategy.sync_every=2", "strategy.fragments=2",
             "strategy.overlap_steps=1", "strategy.compression.name=none", "strategy.compression.block_size=null",
             "strategy.compression.format=null", "strategy.compression.stochastic=null"]


def _train(cfg, world: int, steps: int, attack=None) -> list:
    """Each rank's flat parameters and its metrics after `steps` steps; `attack(step)`: the ByzantineStep
    every rank sees at that step (as chaos.apply hands it out), or None."""
    def body(worker):
        logs = []
        for step in range(steps):
            worker.comm.byzantine = attack(step) if attack else None
            logs.append(worker.train_step(step * world * cfg.data.batch_size, 1e-2))
            worker.comm.byzantine = None
        worker.strategy.finish_syncs()
        return worker.flat_parameters().clone(), logs

    return run_workers_in_threads(cfg, world, body)


def test_trimmed_mean_with_f0_outer_sync_equals_plain_streaming_diloco_bit_for_bit(tmp_path):
    plain = _train(small_cfg(tmp_path / "a", "cluster.num_workers=4", *STREAMING), 4, 7)
    robust = _train(small_cfg(tmp_path / "b", "cluster.num_workers=4", *STREAMING,
                              "strategy.outer.aggregator=trimmed_mean", "strategy.outer.f=0"), 4, 7)
    for (p, _), (q, logs) in zip(plain, robust):
        assert torch.equal(p, q)
    merged = [m for m in robust[0][1] if m["diloco/merged"]]
    assert merged and all(m["outer/byzantine_rows"] == 0 and m["outer/dropped_rows"] == 0 for m in merged)


def test_the_gather_sends_w_minus_1_payloads_and_says_so(tmp_path):
    cfg = small_cfg(tmp_path, "cluster.num_workers=4", *STREAMING, "strategy.outer.aggregator=median")
    (_, logs), *_ = _train(cfg, 4, 3)
    started = [m for m in logs if m["diloco/fragment"] >= 0]
    assert started
    for m in started:  # fp32 rows: (W - 1) copies of this rank's fragment, 4 bytes a value
        assert m["diloco/bytes_this_step"] % (3 * 4) == 0 and m["diloco/bytes_this_step"] > 0


def _ipm_from(rank: int, epsilon: float):
    return lambda step: ByzantineStep((rank,), row_attacks=((rank, "ipm", epsilon, None, -1),))


def test_an_ipm_replica_reverses_the_mean_outer_sync_and_not_the_median(tmp_path):
    """IPM with epsilon 4 from replica 3 of 4 (the rushing adversary's row, -4 x the honest mean, made
    after seeing the honest rows): the mean's outer gradient points against the honest mean, the
    coordinate median's along it; the metrics name the Byzantine row; and the median run ends near
    its own fault-free run."""
    base = ["cluster.num_workers=4", *STREAMING, "strategy.fragments=1", "strategy.overlap_steps=0",
            "strategy.outer.f=1"]
    cos, gap = {}, {}
    for i, rule in enumerate(("mean", "median")):
        cfg = small_cfg(tmp_path / rule, *base, f"strategy.outer.aggregator={rule}")
        clean = _train(cfg, 4, 6)[0][0]
        params, logs = _train(cfg, 4, 6, _ipm_from(3, 4.0))[0]
        merged = [m for m in logs if m["diloco/merged"]]
        assert len(merged) == 3 and all(m["outer/byzantine_rows"] == 1 for m in merged)
        cos[rule] = [m["outer/cos_to_honest_mean"] for m in merged]
        gap[rule] = float((params - clean).norm() / clean.norm())
    assert all(c < 0 for c in cos["mean"]) and all(c > 0.5 for c in cos["median"]), cos
    assert gap["median"] < 0.5 * gap["mean"], gap


@pytest.mark.parametrize("overrides, key", [
    (["strategy=diloco", "cluster.num_workers=2", "strategy.outer.aggregator=krum", "strategy.outer.f=1"],
     "strategy.outer.f"),
    (["strategy=diloco", "strategy.outer.aggregator=nope"], "strategy.outer.aggregator"),
    (["strategy=diloco", "strategy.outer.f=1"], "strategy.outer.f"),
    (["strategy=diloco", "faults=byzantine_alie", "cluster.num_workers=15"], "faults.events[0].mode"),
])
def test_outer_rules_that_cannot_run_are_one_line_errors(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as err:
        small_cfg(tmp_path, *overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_row_attacks_are_accepted_once_the_outer_sync_gathers_rows(tmp_path):
    cfg = small_cfg(tmp_path, "strategy=diloco", "faults=byzantine_alie", "cluster.num_workers=15",
                    "strategy.outer.aggregator=trimmed_mean", "strategy.outer.f=3")
    assert cfg.strategy.aggregates_rows


FP4 = ["strategy.compression.name=fp4", "strategy.compression.block_size=128", "strategy.compression.format=e3m0",
       "strategy.compression.stochastic=false"]


def test_lgreco_outer_compression_with_the_uniform_plan_equals_fixed_fp4(tmp_path):
    fixed = _train(small_cfg(tmp_path / "a", "cluster.num_workers=2", *STREAMING, *FP4), 2, 7)
    uniform = _train(small_cfg(tmp_path / "b", "cluster.num_workers=2", *STREAMING, *FP4,
                               "strategy.outer.compression=lgreco", "strategy.outer.lgreco.quant_bits=[]"), 2, 7)
    for (p, _), (q, logs) in zip(fixed, uniform):
        assert torch.equal(p, q)
    plans = [m for m in uniform[0][1] if "outer/plan_bytes" in m]
    assert plans and all(m["outer/plan_bytes"] == m["outer/plan_bytes_uniform"] for m in plans)


def test_lgreco_outer_compression_plans_fewer_bytes_than_fp4_and_composes_with_a_robust_rule(tmp_path):
    cfg = small_cfg(tmp_path, "cluster.num_workers=3", *STREAMING, *FP4, "model.d_model=64",
                    "strategy.outer.compression=lgreco", "strategy.outer.lgreco.replan_every=1",
                    "strategy.outer.lgreco.min_numel=1024", "strategy.outer.aggregator=median", "strategy.outer.f=1")
    out = _train(cfg, 3, 9, _ipm_from(2, 4.0))
    assert all(torch.isfinite(q).all() for q, _ in out)
    plans = [m for m in out[0][1] if "outer/plan_bytes" in m]
    assert plans and all(m["outer/plan_bytes"] <= m["outer/plan_bytes_uniform"] for m in plans)
    assert any(m["outer/plan_levels"] > 1 for m in plans), plans  # a mixed plan really ran
    merged = [m for m in out[0][1] if m["diloco/merged"]]
    assert merged and all(m["outer/cos_to_honest_mean"] > 0 for m in merged)  # the mean's would be -1
