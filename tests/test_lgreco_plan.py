"""L-GreCo's levels come from the comm layer's one compressor registry and are checked at the run's
world size (`topk:0.7` is refused); per-layer state (PowerSGD, residual buffers) lives across steps;
residuals come from the compressor's own decode (the quantized allreduce's `sent`); the plan is
written as per-layer metrics at each (re)plan and drawn by the report as layers x steps."""

import json

import pytest
import torch

from raylane.comm import connect, host_store, parse_spec, quantized_allreduce
from raylane.comm.quantizers import PackedIntQuantizer, int_quantizer
from raylane.validation import ConfigError
from raylane.workers.worker import TrainWorker
from tests.conftest import small_cfg

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("level,world", [("topk:0.7", 4), ("topk:1.0", 2), ("topk:0.3", 4), ("topk:0.3", 2)])
def test_a_default_level_that_compresses_no_layer_at_this_world_size_is_a_one_line_error(level, world):
    from raylane import config

    with pytest.raises(ConfigError, match=r"strategy.default_level=.*no layer would be compressed") as err:
        config.load(["strategy=lgreco", "strategy.family=topk", f"strategy.default_level={level}",
                     f"cluster.num_workers={world}"])
    assert "\n" not in str(err.value)
    config.load(["strategy=lgreco", "strategy.family=topk", "strategy.default_level=topk:0.1", "cluster.num_workers=4"])


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_packed_int_levels_round_trip_within_half_a_step_in_their_exact_bytes(bits):
    c = int_quantizer(bits, 64)
    assert isinstance(c, PackedIntQuantizer) and parse_spec(f"int:{bits}:64").build().name == f"int{bits}"
    t = torch.randn(1000, generator=torch.Generator().manual_seed(bits))
    payload = c.compress(t)
    assert payload.nbytes == c.payload_bytes((1000,), torch.float32) == -(-1000 * bits // 8) + 4 * 16
    got = c.decompress(c.from_bytes(payload.to_bytes(), (1000,), torch.float32))
    scale = torch.nn.functional.pad(t, (0, 24)).view(-1, 64).abs().amax(1) / (2 ** (bits - 1) - 1)
    assert ((got - t).abs() <= scale.repeat_interleave(64)[:1000] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("spec", ["int:4:128", "int:3:64", "fp4:e2m1:32"])
def test_quantized_allreduce_hands_back_the_decode_of_what_this_rank_sent(spec):
    store = host_store("127.0.0.1")
    comm = connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    c = parse_spec(spec).build()
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    sent = torch.empty(1000)
    expected = c.decompress(c.compress(t.clone()))
    quantized_allreduce(comm, t, c, "avg", key="x", sent=sent)
    assert torch.equal(sent, expected)


def test_plan_metrics_state_reuse_and_the_plan_picture(tmp_path):
    from raylane.report import plan_figure, plan_grid

    cfg = small_cfg(tmp_path, "strategy=lgreco", "strategy.family=powersgd", "strategy.default_level=powersgd:2",
                    "strategy.min_numel=256", "strategy.warmup_steps=2", "strategy.adjust_every=2",
                    "strategy.accumulate_steps=1", "cluster.num_workers=1")
    store = host_store("127.0.0.1")
    worker = TrainWorker(cfg, 0)
    worker.connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    strategy, records, held = worker.strategy, [], {}
    for step in range(1, 8):
        m = worker.train_step((step - 1) * cfg.data.batch_size, 1e-3)
        records.append({"step": step, **{k: v for k, v in m.items() if k.startswith("lgreco/")}})
        if step == 5:
            held = {"psgd": dict(strategy.psgd), "residual": dict(strategy.residual), "level": dict(strategy.level)}
        if "lgreco/bytes_chosen" in m:  # alpha = 1: never more bytes nor more error than the default
            assert m["lgreco/bytes_chosen"] <= m["lgreco/bytes_default"]
            assert m["lgreco/error_total"] <= m["lgreco/error_budget"] * (1 + 1e-9)
    names = [layer.name for layer in strategy.layers]
    planned = [r["step"] for r in records if f"lgreco/plan/{names[0]}/level" in r]
    assert planned[0] == 1 and 3 in planned  # the warm-up's plan, then the first choice
    first = records[2]
    assert all(first[f"lgreco/plan/{n}/level"].startswith("powersgd:") for n in names)
    assert all(first[f"lgreco/plan/{n}/bytes_per_value"] < 4.0 == records[0][f"lgreco/plan/{n}/bytes_per_value"]
               for n in names)
    for name in names:  # steps 5 to 7: the same residual buffers; the same PowerSGD where the level held
        assert strategy.residual[name] is held["residual"][name]
        assert (strategy.psgd[name] is held["psgd"][name]) == (strategy.level[name] == held["level"][name])
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    layers, steps, grid = plan_grid(records)
    assert layers == names and steps == list(range(1, 8)) and grid[0][0] == 4.0 and grid[0][-1] < 4.0
    svg = plan_figure("run", records)
    assert svg.startswith("<figure") and "L-GreCo plan" in svg and "<svg" in svg
    assert plan_figure("ddp", [{"step": 1, "train/loss": 1.0}]) == ""
