"""L-GreCo's knapsack: the DP's optimum is brute force's; with alpha = 1 it never sends more than the
uniform default nor errs more; the per-level errors it is fed are the compressors' real errors."""

import itertools
import math

import numpy as np
import pytest
import torch

from raylane.strategies.blocks.compression_plan.dp import choose_levels, solve_mckp
from raylane.strategies.blocks.compression_plan.levels import applies, compressor, errors, in_range, wire_bytes

pytestmark = pytest.mark.timeout(60)


def _brute(sizes, errs, budget):
    """Least total size over every choice with total error <= budget (None when nothing fits)."""
    best = None
    for pick in itertools.product(*[range(sizes.shape[1])] * sizes.shape[0]):
        rows = np.arange(len(pick))
        size, err = sizes[rows, pick].sum(), errs[rows, pick].sum()
        if np.isfinite(size) and err <= budget and (best is None or size < best):
            best = size
    return best


def _instance(rng, layers, cols):
    sizes = rng.integers(1, 1000, (layers, cols)).astype(float)
    errs = rng.uniform(0, 10, (layers, cols))
    default = [int(c) for c in rng.integers(0, cols, layers)]
    off = rng.random((layers, cols)) < 0.15  # some levels do not apply to some layers (never the default)
    off[np.arange(layers), default] = False
    sizes[off] = np.inf
    errs[~np.isfinite(sizes)] = np.nan
    return sizes, errs, default


def test_dp_returns_the_brute_force_optimum_on_random_integer_instances():
    rng = np.random.default_rng(0)
    for _ in range(300):
        layers, cols, capacity = rng.integers(1, 6), rng.integers(1, 5), int(rng.integers(0, 30))
        sizes = rng.integers(1, 100, (layers, cols)).astype(float)
        costs = rng.integers(0, 12, (layers, cols))
        found = solve_mckp(sizes, costs, capacity)
        expected = _brute(sizes, costs.astype(float), capacity)
        if expected is None:
            assert found is None
            continue
        pick, total = found
        assert total == expected
        assert sizes[np.arange(layers), pick].sum() == total and costs[np.arange(layers), pick].sum() <= capacity


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_choice_is_feasible_and_within_one_discretisation_step_of_the_real_optimum(alpha):
    rng = np.random.default_rng(1)
    delta = 0.02
    for _ in range(150):
        layers, cols = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        sizes, errs, default = _instance(rng, layers, cols)
        choice = choose_levels(errs, sizes, default, alpha, delta)
        rows = np.arange(layers)
        budget = alpha * errs[rows, default].sum()
        assert choice.budget == pytest.approx(budget)
        assert choice.bytes == sizes[rows, choice.levels].sum()
        assert choice.error == pytest.approx(errs[rows, choice.levels].sum())
        best_real = _brute(sizes, np.nan_to_num(errs, nan=np.inf), budget)
        if best_real is None:  # nothing fits (alpha < 1): the least error there is
            assert alpha < 1 and choice.error == pytest.approx(np.nanmin(errs, axis=1).sum())
            continue
        assert choice.error <= budget * (1 + 1e-12)
        assert choice.bytes >= best_real
        # anything erring one unit per layer less than the budget fits after rounding up
        tighter = _brute(sizes, np.nan_to_num(errs, nan=np.inf), budget - layers * delta * budget)
        if tighter is not None:
            assert choice.bytes <= tighter


def test_alpha_one_never_sends_more_than_the_uniform_default_nor_errs_more():
    rng = np.random.default_rng(2)
    for _ in range(200):
        sizes, errs, default = _instance(rng, int(rng.integers(1, 8)), int(rng.integers(1, 6)))
        rows = np.arange(sizes.shape[0])
        choice = choose_levels(errs, sizes, default, 1.0, 0.001)
        assert choice.bytes <= sizes[rows, default].sum()
        assert choice.error <= errs[rows, default].sum() * (1 + 1e-12)


def test_zero_budget_keeps_only_exact_levels():
    errs = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    sizes = np.array([[10.0, 1.0, 5.0], [9.0, 8.0, 1.0]])
    choice = choose_levels(errs, sizes, [0, 1], 1.0, 0.01)
    assert choice.levels == [2, 1] and choice.error == 0.0


def test_measured_errors_are_the_compressors_round_trip_errors():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(64, 48, generator=g) * torch.linspace(0.1, 3, 48)
    levels = ["none", "int:8:256", "int:4:128", "sign:256", "topk:0.05", "powersgd:2", "powersgd:48"]
    got = dict(zip(levels, errors(levels, acc)))
    for level in ["int:8:256", "int:4:128", "sign:256", "topk:0.05"]:
        c = compressor(level)
        real = (c.decompress(c.compress(acc)) - acc).double().norm().item()
        assert got[level] == pytest.approx(real, rel=1e-5)
    s = torch.linalg.svdvals(acc.double())
    assert got["powersgd:2"] == pytest.approx(s[2:].square().sum().sqrt().item())
    assert got["none"] == 0.0 and got["powersgd:48"] == pytest.approx(0.0, abs=1e-9)  # full rank: exact
    assert not applies("powersgd:48", (64, 48), 2)  # ... but it sends more than the matrix: no candidate
    assert math.isnan(errors(["powersgd:1"], torch.ones(5000))[0])  # a vector has no low rank


def test_wire_bytes_follow_each_collective():
    shape, world = (256, 64), 4
    raw = 256 * 64 * 4
    assert wire_bytes("none", shape, world) == 2 * (world - 1) * raw  # ring: 2(W-1)/W N b per rank
    assert wire_bytes("powersgd:2", shape, world) == 2 * (world - 1) * 4 * 2 * (256 + 64)
    k = round(0.01 * 256 * 64)
    assert wire_bytes("topk:0.01", shape, world) == world * (world - 1) * k * 8  # allgather of values+indices
    assert wire_bytes("int:8:256", shape, world) == 2 * (world - 1) * (256 * 64 + 4 * 64)


def test_benchmark_claims_are_ratios_of_the_rows_against_the_same_familys_default():
    from benchmarks.lgreco import claims

    def row(system, family, kind, loss, nbytes):
        return {"system": system, "family": family, "kind": kind, "eval_loss": loss, "bytes": nbytes}
    rows = [row("ddp", "ddp", "ddp", 2.0, 1000.0), row("uniform topk:0.01", "topk", "default", 2.02, 300.0),
            row("uniform topk:0.005", "topk", "cheaper", 2.5, 50.0), row("lgreco topk", "topk", "lgreco", 2.03, 150.0)]
    runs = {r["system"]: [{"seed": 0, "bytes": r["bytes"]}] for r in rows}
    vs_default, vs_ddp, any_family = claims(rows, runs, None)
    assert vs_default["value"] == 2.0 and vs_default["holds"]  # +0.5% loss vs the default: passes
    assert vs_ddp["value"] == round(1000 / 150, 4) and not vs_ddp["holds"]  # +1.5% behind ddp
    assert any_family["value"] == vs_ddp["value"] and not any_family["holds"]
    rows[3]["eval_loss"] = 1.9  # a better loss than the default's passes too
    assert claims(rows, runs, None)[0]["holds"] and claims(rows, runs, None)[1]["holds"]
    rows[3]["eval_loss"] = 2.05  # 1.5% worse than the default: fails whatever the bytes
    assert not claims(rows, runs, None)[0]["holds"]


def test_level_range_keeps_the_candidates_within_gamma_to_beta_times_the_default_bytes():
    shape, world = (512, 128), 4
    kept_levels = [lv for lv in ["powersgd:1", "powersgd:8", "topk:0.001", "topk:0.03", "bf16", "int:8:256",
                                 "int:4:128", "int:2:128", "fp4:e2m1:128", "sign:256"]
                   if in_range(lv, "int:4:128", shape, world, [0.5, 2.0])]
    for lv in kept_levels:
        assert 0.5 * 0.99 <= wire_bytes(lv, shape, world) / wire_bytes("int:4:128", shape, world) <= 2.0 * 1.01
    # sign, bf16, rank 1 out
    assert kept_levels == ["powersgd:8", "topk:0.03", "int:8:256", "int:4:128", "int:2:128", "fp4:e2m1:128"]
    for shape in [(512, 128), (96, 128), (128, 512)]:  # k rounded: twice and half the density stay in
        assert in_range("topk:0.02", "topk:0.01", shape, world, [0.5, 2.0])
        assert in_range("topk:0.005", "topk:0.01", shape, world, [0.5, 2.0])
    assert in_range("sign:256", "int:4:128", shape, world, None)  # null: every candidate


@pytest.mark.parametrize("bad", ["[0.5]", "[0, 2]", "[1.5, 2]", "[0.5, 0.9]"])
def test_level_range_outside_gamma_le_1_le_beta_is_a_one_line_config_error(bad):
    from raylane import config
    from raylane.validation import ConfigError

    with pytest.raises(ConfigError, match="strategy.level_range"):
        config.load(["strategy=lgreco", f"strategy.level_range={bad}"])
