"""lgreco's `error_metric`: `l2` is the paper's ||C(g) - g||; `adam` weighs the error per value by AdamW's
1 / (sqrt(v) + eps) (the error in the optimizer's update space). A unit weight gives the unweighted
errors for every family, a constant weight scales them, PowerSGD's weighted error is its best rank-r
approximation's, a weight on top-k's kept values only sees no error; the worker reads v from its
optimizer; a non-Adam optimizer is a one-line config error."""

import pytest
import torch

from raylane.comm import host_store
from raylane.comm.sparse import kept
from raylane.strategies.blocks.compression_plan.levels import errors
from raylane.workers.worker import TrainWorker
from tests.conftest import small_cfg

pytestmark = pytest.mark.timeout(60)

LEVELS = ["none", "powersgd:1", "powersgd:3", "topk:0.01", "topk:0.1", "int:8:256", "int:4:128", "int:2:128",
          "fp4:e2m1:128", "sign:256"]


def _grad(rows=96, cols=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * torch.linspace(0.01, 3, cols)


def test_a_unit_weight_gives_the_unweighted_errors_and_a_constant_weight_scales_them():
    g = _grad()
    plain = errors(LEVELS, g)
    assert errors(LEVELS, g, torch.ones_like(g)) == pytest.approx(plain, rel=1e-9, abs=1e-12)
    assert errors(LEVELS, g, torch.full_like(g, 2.5)) == pytest.approx([2.5 * e for e in plain], rel=1e-9, abs=1e-12)


def test_weighted_powersgd_error_is_that_of_the_best_rank_r_approximation():
    g = _grad(seed=1)
    w = torch.rand(g.shape, generator=torch.Generator().manual_seed(2)) + 0.1
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    for r in (1, 3):
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert errors([f"powersgd:{r}"], g, w)[0] == pytest.approx(float(((best - g.double()) * w.double()).norm()))


def test_a_weight_on_the_values_top_k_keeps_sees_no_error():
    g = _grad(seed=3)
    k = kept(g.numel(), 0.1)
    w = torch.zeros(g.numel())
    w[g.reshape(-1).abs().topk(k).indices] = 1.0
    assert errors(["topk:0.1"], g, w.view_as(g)) == [0.0]
    assert errors(["topk:0.01"], g, w.view_as(g))[0] > 0  # keeps fewer: some weighted values dropped


def test_adam_metric_weighs_by_the_optimizers_second_moments(tmp_path):
    cfg = small_cfg(tmp_path, "strategy=lgreco", "strategy.family=quant", "strategy.default_level=int:4:128",
                    "strategy.min_numel=256", "strategy.warmup_steps=2", "strategy.adjust_every=2",
                    "strategy.accumulate_steps=1", "strategy.error_metric=adam", "cluster.num_workers=1")
    store = host_store("127.0.0.1")
    worker = TrainWorker(cfg, 0)
    worker.connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    strategy, opt = worker.strategy, worker.optimizer
    layer = strategy.layers[0]
    assert strategy._weight(layer) is None  # before the first step: no second moments yet
    metrics = {}
    for step in range(1, 4):  # warm-up, then the choice at the start of step 3 from step 2's gradient
        v = opt.state[layer.param]["exp_avg_sq"].clone() if layer.param in opt.state else None
        acc = strategy.accum.get(layer.name)
        acc = None if acc is None else acc.clone()
        metrics = worker.train_step((step - 1) * cfg.data.batch_size, 1e-3)
    eps = opt.param_groups[0]["eps"]
    expected = errors(strategy.columns, acc.view(layer.param.shape), 1.0 / (v.sqrt() + eps))
    chosen = metrics[f"lgreco/plan/{layer.name}/level"]
    assert metrics[f"lgreco/plan/{layer.name}/error"] == pytest.approx(expected[strategy.columns.index(chosen)])
    strategy.cfg.error_metric = "l2"
    assert strategy._weight(layer) is None


def test_adam_metric_without_adamw_is_a_one_line_config_error():
    from raylane import config
    from raylane.validation import ConfigError

    with pytest.raises(ConfigError, match="strategy.error_metric.*optim.name=adamw"):
        config.load(["strategy=lgreco", "strategy.error_metric=adam", "optim.name=sgd"])
    with pytest.raises(ConfigError, match="strategy.error_metric"):
        config.load(["strategy=lgreco", "strategy.error_metric=cosine"])
