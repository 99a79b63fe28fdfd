"""gradient_coding: with injected stragglers every scheme ends with the parameters of uncoded
synchronous training (also after a resume mid-pipeline), gc equals ddp, rounds never hang; the
worker half's coded vectors and per-stream updates; impossible codes are config errors."""

import time

import numpy as np
import pytest
import torch

from raylane.comm import CompressionConfig
from raylane.orchestrator.coordinator import Coordinator
from raylane.strategies.gradient_coding.strategy import CodedDriver, GradientCodingConfig, RoundTimeout
from raylane.validation import ConfigError
from tests.conftest import small_cfg

STEPS = 10
# Each Ray test trains for < 60 s itself; the 120 s bounds also cover the first one's share of the
# session cluster and the module's uncoded reference run.
BURSTY = "strategy.stragglers={model: bursty, delay_s: 0.25, p_on: 0.25, p_off: 0.5}"
STREAMS = "strategy.streams=3"  # enough for every scheme below (m_sgc with B=1, W=3 has delay T=2)


def train(tmp_path, name: str, *overrides: str):
    """(final parameters, driver totals, number of parameters) of a 4-worker run, flushed."""
    cfg = small_cfg(tmp_path, f"train.steps={STEPS}", "cluster.num_workers=4", "optim.warmup_steps=3",
                    f"run.name={name}", *overrides)
    coord = Coordinator(cfg)
    try:
        coord.train()
        flush = getattr(coord.driver, "flush", None)
        if flush is not None:
            flush(coord.group)
        params = coord.group.get(coord.group.call("flat_parameters"))
    finally:
        coord.close()
    for p in params[1:]:
        assert torch.equal(p, params[0]), "replicas diverged"
    return params[0], getattr(coord.driver, "totals", {}), params[0].numel()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def uncoded(ray_cluster, tmp_path_factory):
    """Uncoded synchronous training (wait for all) of the same 3 model streams on the same data."""
    return train(tmp_path_factory.mktemp("ref"), "uncoded", "strategy=gradient_coding", "strategy.scheme=uncoded",
                 STREAMS)[0]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_gc_frc_with_injected_stragglers_ends_with_the_parameters_of_uncoded_training(uncoded, tmp_path):
    params, totals, n_params = train(tmp_path, "frc", "strategy=gc", "strategy.s=1", BURSTY, STREAMS)
    assert totals["stragglers"] > 0, "no straggler was tolerated"
    assert max_diff(params, uncoded) <= 1e-5
    answered = STEPS * 4 - totals["stragglers"]   # each answer is one float64 vector: gradient + loss
    assert totals["bytes_sent"] == answered * (n_params + 1) * 8
    assert totals["bytes_recv"] == STEPS * 4 * n_params * 4  # every worker gets each decoded fp32 update


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_gc_crc_with_injected_stragglers_ends_with_the_parameters_of_uncoded_training(uncoded, tmp_path):
    params, totals, _ = train(tmp_path, "crc", "strategy=gc", "strategy.s=2", "strategy.code=crc", BURSTY, STREAMS)
    assert totals["stragglers"] > 0
    assert max_diff(params, uncoded) <= 1e-5


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme,rule", [("sr_sgc", "silence"), ("m_sgc", "silence"), ("sr_sgc", "fastest")])
def test_sgc_with_injected_stragglers_ends_with_the_parameters_of_uncoded_training(uncoded, tmp_path, scheme, rule):
    params, totals, _ = train(tmp_path, scheme, f"strategy={scheme}", "strategy.window=3", BURSTY, STREAMS,
                              f"strategy.straggler_rule={rule}")
    assert totals["decoded"] == STEPS and totals["stragglers"] > 0
    if rule == "silence":
        assert totals["violations"] > 0, "this pattern should sometimes leave the (B, W, lambda) model"
    assert max_diff(params, uncoded) <= 1e-5


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_m_sgc_resumed_mid_pipeline_ends_with_the_parameters_of_uncoded_training(uncoded, tmp_path):
    overrides = ["strategy=m_sgc", "strategy.window=3", BURSTY, STREAMS, "checkpoint.every=5"]
    cfg = small_cfg(tmp_path, f"train.steps={STEPS}", "cluster.num_workers=4", "optim.warmup_steps=3",
                    "run.name=resumed", *overrides)
    coord = Coordinator(cfg)
    try:
        coord.train(until_step=5)
        assert coord.driver.schedule.pending(), "the checkpoint should hold jobs in flight"
    finally:
        coord.close()
    params, _, _ = train(tmp_path, "resumed", "resume=true", *overrides)
    assert max_diff(params, uncoded) <= 1e-5


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_gc_with_injected_stragglers_equals_ddp(ray_cluster, tmp_path):
    ddp, _, _ = train(tmp_path, "ddp", "strategy=ddp")
    gc, totals, _ = train(tmp_path, "gc", "strategy=gc", "strategy.s=1", BURSTY)
    assert totals["stragglers"] > 0
    assert max_diff(ddp, gc) <= 1e-5


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_round_that_cannot_decode_times_out_instead_of_hanging(ray_cluster, tmp_path):
    cfg = small_cfg(tmp_path, "train.steps=3", "cluster.num_workers=4", "strategy=gc", "strategy.s=1",
                    "strategy.timeout_s=2", "strategy.stragglers={model: fixed, delay_s: 30, ranks: [0, 1]}",
                    "strategy.code=crc")
    coord = Coordinator(cfg)
    try:
        t0 = time.monotonic()
        with pytest.raises(RoundTimeout, match=r"strategy.timeout_s=2.0: round 1 \(gc\) cannot end without "
                                               r"workers \[0, 1\]"):
            coord.train()
        assert time.monotonic() - t0 < 10
    finally:
        coord.close()


@pytest.fixture
def worker(tmp_path):
    """A single TrainWorker (no Ray) running the gradient_coding worker half with 2 streams."""
    from raylane.comm import host_store
    from raylane.workers.worker import TrainWorker

    cfg = small_cfg(tmp_path, "cluster.num_workers=1", "strategy=gradient_coding", "strategy.s=0", "strategy.streams=2")
    w = TrainWorker(cfg, rank=0)
    store = host_store("127.0.0.1")
    w.connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    yield w.strategy
    w.comm.abort()


def test_a_coded_vector_is_the_weighted_sum_of_its_partition_gradients(worker):
    def coded(parts, stream=0):
        return worker.gc_compute([(stream, 0, parts)], atoms=4)["vectors"][0]

    a, b = coded([(0, 2, 1.0)]), coded([(2, 2, 1.0)])   # batch of 4: atoms of one sample
    assert np.allclose(coded([(0, 2, 1.0), (2, 2, -0.5)]), a - 0.5 * b, rtol=1e-12, atol=0)
    whole = coded([(0, 4, 1.0)])                        # one pass over the whole batch
    assert np.allclose(whole, a + b, rtol=1e-5, atol=1e-7)
    assert whole[-1] == pytest.approx(worker.ctx.loss(worker.fetch(0, 4)).item(), rel=1e-6)


def test_an_update_of_one_stream_leaves_the_others_alone(worker):
    own = [p.detach().clone() for p in worker.params]
    coded = worker.gc_compute([(1, 0, [(0, 4, 1.0)])], atoms=4)["vectors"][0]
    payload = CompressionConfig().build().compress(torch.from_numpy(coded[:-1].astype(np.float32)))
    worker.gc_apply(1, payload, lr=0.1)
    assert all(torch.equal(p, q) for p, q in zip(worker.params, own)), "stream 0 (the model) moved"
    assert any(not torch.equal(t, q) for t, q in zip(worker.streams[0].tensors, own)), "stream 1 did not move"
    assert not np.allclose(worker.gc_compute([(1, 0, [(0, 4, 1.0)])], atoms=4)["vectors"][0], coded)


IMPOSSIBLE = [(["strategy=gc", "strategy.s=4"], "strategy.s=4: gives 4 stragglers per round; must be < "
                                               "cluster.num_workers=4"),
              (["strategy=gc", "strategy.s=2", "strategy.code=frc"],
               "strategy.code='frc': frc needs (s+1)=3 to divide"),
              (["strategy=m_sgc", "strategy.lam=5"], "strategy.lam=5: must be <= cluster.num_workers=4"),
              (["strategy=sr_sgc", "strategy.burst=1", "strategy.window=2", "strategy.lam=8"],
               "strategy.lam=8: gives 4 stragglers"),
              (["strategy=sr_sgc", "strategy.burst=1", "strategy.window=5", "strategy.lam=5"],
               "strategy.lam=5: must be <= cluster.num_workers=4")]


def _earlier_run(root):
    """A finished earlier run in the run dir the bad command names: it must stay where it is."""
    earlier = root / "gc"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("seed: 0\n")
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    (earlier / "summary.yaml").write_text("steps: 1\n")
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("overrides,message", IMPOSSIBLE)
def test_impossible_codes_are_config_errors_before_ray_starts_or_a_directory_is_touched(
        monkeypatch, capsys, tmp_path, overrides, message):
    import ray

    from raylane import train

    def no_ray(*a, **k):
        raise AssertionError("ray.init called for a code no scheme can meet")

    monkeypatch.setattr(ray, "init", no_ray)
    before = _earlier_run(tmp_path)
    args = ["cluster.num_workers=4", f"run.root={tmp_path}", "run.name=gc", *overrides]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the earlier run was moved or a dir was made"


def test_an_impossible_code_exits_2_in_one_line_from_the_command_line(tmp_path):
    import subprocess
    import sys

    before = _earlier_run(tmp_path)
    env = {"RAY_ADDRESS": "127.0.0.1:9", "PATH": "/usr/bin:/bin"}  # any Ray contact would fail loudly
    proc = subprocess.run([sys.executable, "-m", "raylane.train", "cluster.num_workers=4", f"run.root={tmp_path}",
                           "run.name=gc", *IMPOSSIBLE[0][0]], capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and IMPOSSIBLE[0][1] in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "gc" / "summary.yaml").exists()


def test_the_driver_still_refuses_a_code_for_another_world_size():
    with pytest.raises(ConfigError, match=r"strategy.s=4: gives 4 stragglers per round; must be < "
                                          r"cluster.num_workers=4"):
        CodedDriver(GradientCodingConfig(scheme="gc", s=4), 4)


def test_the_straggler_rule_is_a_config_choice():
    GradientCodingConfig(straggler_rule="fastest").validate("strategy")
    with pytest.raises(ConfigError, match=r"strategy.straggler_rule='slow'"):
        GradientCodingConfig(straggler_rule="slow").validate("strategy")
