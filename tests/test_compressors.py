"""Compressors: round-trip error within each one's analytic bound, packed sizes equal to the
formulas, edge values, determinism, and the `compression` config group."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from raylane.comm.compression_config import CompressionConfig, register_compressor
from raylane.comm.compressors import Bf16, Cast, Fp16, Identity, Zstd
from raylane.comm.error_feedback import ErrorFeedback
from raylane.comm.powersgd import PowerSGD
from raylane.comm.quantizers import FP4Quantizer, IntQuantizer, SignQuantizer
from raylane.comm.sparse import RandomK, TopK, top_indices

pytestmark = pytest.mark.timeout(120)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "compression"
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SMALLEST_STEP = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}
GRIDS = {"e2m1": [0, .5, 1, 1.5, 2, 3, 4, 6], "e3m0": [0] + [2.0 ** e for e in range(-6, 1)]}


def compressors() -> dict:
    """Fresh instances; small blocks so that test tensors have several, and a partial last one."""
    return {"none": Identity(), "fp16": Fp16(), "bf16": Bf16(),
            "int8": IntQuantizer(8, 64), "int8_sr": IntQuantizer(8, 64, stochastic=True, seed=1),
            "int4": IntQuantizer(4, 64), "int4_sr": IntQuantizer(4, 64, stochastic=True, seed=2),
            "fp4_e2m1": FP4Quantizer("e2m1", 64), "fp4_e3m0": FP4Quantizer("e3m0", 32),
            "fp4_e3m0_sr": FP4Quantizer("e3m0", 32, stochastic=True), "sign": SignQuantizer(64),
            "topk": TopK(0.05), "randomk": RandomK(0.05, seed=3), "powersgd": PowerSGD(rank=2),
            "int8_zstd": Zstd(IntQuantizer(8, 64), 3)}


def sample(shape, dtype, seed=0) -> torch.Tensor:
    """Heavy-tailed values: blocks of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.randn(shape, generator=g).exp() * 3).to(dtype)


def _block_stat(x: torch.Tensor, block: int, fn) -> torch.Tensor:
    """fn over each block of the flat x, broadcast back to every value."""
    n = x.numel()
    rows = torch.cat([x, x.new_zeros(-n % block)]).view(-1, block)
    counts = torch.full((rows.shape[0], 1), float(block))
    counts[-1] = n - block * (rows.shape[0] - 1)
    return fn(rows.abs(), counts).expand_as(rows).reshape(-1)[:n]


def round_trip_bound(c, x: torch.Tensor) -> torch.Tensor:
    """Largest |decompress(compress(x)) - x| each value may have, before the output dtype's rounding."""
    c = c.inner if isinstance(c, Zstd) else c
    if isinstance(c, Identity):
        return torch.zeros_like(x)
    if isinstance(c, Cast):
        tiny = 2.0 ** -25 if c.target == torch.float16 else 2.0 ** -134
        return x.abs() * UNIT_ROUNDOFF[c.target] + tiny
    if isinstance(c, (TopK, RandomK)):
        return x.abs()
    absmax = _block_stat(x, c.block_size, lambda a, n: a.amax(1, keepdim=True))
    if isinstance(c, SignQuantizer):
        mean = _block_stat(x, c.block_size, lambda a, n: a.sum(1, keepdim=True) / n)
        return torch.maximum(mean, absmax - mean)
    reach = 1.0 if c.stochastic else 0.5  # nearest rounding: half a step; stochastic: a whole one
    if isinstance(c, IntQuantizer):
        return reach * absmax / c.qmax
    grid = torch.tensor(GRIDS[c.format])
    scale = absmax / grid[-1]
    mag = torch.where(scale > 0, x.abs() / scale, 0.0).clamp(max=grid[-1].item())
    lo = (torch.bucketize(mag, grid, right=True) - 1).clamp(0, len(grid) - 2)
    return reach * (grid[lo + 1] - grid[lo]) * scale


def assert_within_bound(c, x: torch.Tensor, y: torch.Tensor) -> None:
    x32, y32 = x.float().reshape(-1), y.float().reshape(-1)
    bound = round_trip_bound(c, x32)
    if y.dtype != torch.float32:  # decompress rounds to the tensor's dtype
        bound = bound + (x32.abs() + bound) * UNIT_ROUNDOFF[y.dtype] + SMALLEST_STEP[y.dtype]
    bound = bound * (1 + 1e-5) + 1e-30
    excess = (y32 - x32).abs() - bound
    assert excess.max() <= 0, f"{c!r}: error exceeds bound by {excess.max().item():.3g}"


SHAPES = [(1,), (1000,), (3, 5, 77), (257,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", [n for n in compressors() if n != "powersgd"])
def test_round_trip_error_is_within_the_analytic_bound(name, shape, dtype):
    c = compressors()[name]
    x = sample(shape, dtype)
    y = c.decompress(c.compress(x, "w"))
    assert y.shape == x.shape and y.dtype == dtype
    assert_within_bound(c, x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_keeps_exactly_the_largest_values(dtype):
    x = sample((3, 5, 77), dtype)
    y = TopK(0.05).decompress(TopK(0.05).compress(x))
    kept = y != 0
    assert kept.sum() == round(0.05 * x.numel())
    assert torch.equal(y[kept], x[kept])
    assert x[~kept].float().abs().max() <= x[kept].float().abs().min()


@pytest.mark.parametrize("layout", ["random", "sample_misleads"])
def test_topk_fast_path_selects_the_same_set_as_a_full_sort(layout):
    n, k = 300_000, 3000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).abs()
    if layout == "sample_misleads":  # the strided sample sees only huge values: too few candidates
        x[:: n // 2 ** 16] += 100
    assert torch.equal(top_indices(x, k).sort().values, x.topk(k).indices.sort().values)


def test_randomk_keeps_exact_values_at_positions_shared_by_equal_seeds():
    x, other = sample((1000,), torch.float32, 0), sample((1000,), torch.float32, 1)
    a, b = RandomK(0.05, seed=7), RandomK(0.05, seed=7)
    ya, yb = a.decompress(a.compress(x, "w")), b.decompress(b.compress(other, "w"))
    assert torch.equal(ya != 0, yb != 0) and (ya != 0).sum() == 50
    assert torch.equal(ya[ya != 0], x[ya != 0])
    assert not torch.equal(ya != 0, a.decompress(a.compress(x, "w")) != 0)  # next call, new positions
    assert torch.equal(RandomK(0.05, seed=0).decompress(a.compress(x, "v")),
                       a.decompress(RandomK(0.05, seed=7).compress(x, "v")))  # the seed travels


def test_sign_squared_error_per_block_equals_norm_minus_mean_square():
    x = sample((257,), torch.float32)
    y = SignQuantizer(64).decompress(SignQuantizer(64).compress(x))
    for block in torch.split(torch.arange(257), 64):
        xb, err = x[block], (y - x)[block]
        mean = xb.abs().mean()
        expected = xb.square().sum() - len(block) * mean ** 2
        torch.testing.assert_close(err.square().sum(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 30), (6, 5, 7)], ids=str)
def test_powersgd_error_never_exceeds_the_norm(shape):
    x = sample(shape, torch.float32)
    y = PowerSGD(rank=2).decompress(PowerSGD(rank=2).compress(x))
    assert (y - x).norm() <= x.norm()


def test_powersgd_reconstructs_rank_r_matrices_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g) @ torch.randn(3, 40, generator=g)
    y = PowerSGD(rank=3).decompress(PowerSGD(rank=3).compress(x))
    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_powersgd_warm_start_approaches_the_best_rank_r_error():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    x = u @ torch.diag(0.8 ** torch.arange(40.0)) @ v.T  # singular values 0.8^i
    best = (0.8 ** torch.arange(2.0, 40.0)).square().sum().sqrt()
    warm, cold = PowerSGD(rank=2), PowerSGD(rank=2, warm_start=False)
    for _ in range(30):
        y_warm, y_cold = warm.decompress(warm.compress(x, "w")), cold.decompress(cold.compress(x, "w"))
    assert (y_warm - x).norm() <= best * 1.01 < (y_cold - x).norm()
    restored = PowerSGD(rank=2)
    restored.load_state_dict(warm.state_dict())
    assert torch.equal(restored.compress(x, "w").parts["p"], warm.compress(x, "w").parts["p"])


def test_powersgd_rejects_vectors_instead_of_sending_them_uncompressed():
    with pytest.raises(ValueError, match="PowerSGD compresses matrices"):
        PowerSGD().compress(torch.ones(10))


def expected_payload_bytes(name: str, c, n: int, shape, dtype) -> int:
    """The wire-size formulas, written out independently of the compressors."""
    blocks = math.ceil(n / c.block_size) if hasattr(c, "block_size") else 0
    return {"none": n * dtype.itemsize, "fp16": 2 * n, "bf16": 2 * n,
            "int8": n + 4 * blocks, "int8_sr": n + 4 * blocks,
            "int4": math.ceil(n / 2) + 4 * blocks, "int4_sr": math.ceil(n / 2) + 4 * blocks,
            "fp4_e2m1": math.ceil(n / 2) + 4 * blocks, "fp4_e3m0": math.ceil(n / 2) + 4 * blocks,
            "fp4_e3m0_sr": math.ceil(n / 2) + 4 * blocks, "sign": math.ceil(n / 8) + 4 * blocks,
            "topk": max(1, round(0.05 * n)) * (dtype.itemsize + 4),
            "randomk": max(1, round(0.05 * n)) * dtype.itemsize + 8,
            "powersgd": 4 * min(2, shape[0], n // shape[0]) * (shape[0] + n // shape[0]) if len(shape) > 1 else 0,
            }[name]


FIXED_SIZE_CASES = [(name, shape) for name in compressors() if name != "int8_zstd"
                    for shape in [(1,), (7,), (1000,), (3, 5, 77), (129, 2)] if name != "powersgd" or len(shape) > 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,shape", FIXED_SIZE_CASES, ids=str)
def test_packed_payload_size_equals_the_formula(name, shape, dtype):
    c, n = compressors()[name], math.prod(shape)
    payload = c.compress(sample(shape, dtype))
    assert payload.nbytes == c.payload_bytes(shape, dtype) == expected_payload_bytes(name, c, n, shape, dtype)
    assert payload.to_bytes().numel() == payload.nbytes
    assert c.expected_ratio(shape, dtype) == payload.nbytes / (n * dtype.itemsize)


def test_sub_byte_codes_are_really_packed():
    x = sample((1001,), torch.float32)
    assert IntQuantizer(4, 1001).compress(x).parts["codes"].numel() == 501
    assert FP4Quantizer("e3m0", 1001).compress(x).parts["codes"].numel() == 501
    assert SignQuantizer(1001).compress(x).parts["signs"].numel() == 126


@pytest.mark.parametrize("name", list(compressors()))
def test_zeros_decompress_to_exact_zeros(name):
    c, x = compressors()[name], torch.zeros(3, 5, 77)
    assert torch.equal(c.decompress(c.compress(x)), x)


@pytest.mark.parametrize("name", [n for n in compressors() if n not in ("topk", "randomk", "powersgd")])
@pytest.mark.parametrize("value", [1.0, -3.5, 1e-3])
def test_constant_tensors_stay_within_bound(name, value):
    c, x = compressors()[name], torch.full((3, 5, 77), value)
    assert_within_bound(c, x, c.decompress(c.compress(x)))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("name", list(compressors()))
def test_inf_and_nan_inputs_are_rejected(name, bad):
    x = torch.ones(4, 8)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="has inf or nan values"):
        compressors()[name].compress(x)


def test_fp16_overflow_raises_instead_of_sending_inf():
    with pytest.raises(ValueError, match="overflow torch.float16"):
        Fp16().compress(torch.tensor([1.0, 7e4]))


def test_unsupported_dtypes_are_rejected():
    for t in (torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.int32)):
        with pytest.raises(ValueError, match="must be one of"):
            IntQuantizer().compress(t)


def test_stochastic_rounding_is_seeded_and_unbiased():
    x = sample((256,), torch.float32)
    a, b = IntQuantizer(4, 256, stochastic=True, seed=5), IntQuantizer(4, 256, stochastic=True, seed=5)
    assert torch.equal(a.compress(x).parts["codes"], b.compress(x).parts["codes"])
    mean = torch.stack([a.decompress(a.compress(x)) for _ in range(400)]).mean(0)
    step = x.abs().max() / 7
    assert (mean - x).abs().max() < 0.25 * step  # nearest rounding is off by up to 0.5 step
    assert (IntQuantizer(4, 256).decompress(IntQuantizer(4, 256).compress(x)) - x).abs().max() > 0.3 * step


def test_zstd_stage_is_lossless_and_shrinks_repetitive_payloads():
    inner, x = IntQuantizer(8, 64), sample((4096,), torch.float32)
    x[1000:] = 0
    z = Zstd(inner, 9)
    payload = z.compress(x)
    assert torch.equal(z.decompress(payload), inner.decompress(inner.compress(x)))
    assert payload.nbytes < inner.payload_bytes(x.shape, x.dtype) / 2
    with pytest.raises(ValueError, match="read Payload.nbytes"):
        z.payload_bytes(x.shape, x.dtype)


def test_payload_bytes_round_trip_through_from_bytes():
    for name, c in compressors().items():
        x = sample((3, 5, 77), torch.bfloat16)
        payload = c.compress(x, "w")
        parsed = c.from_bytes(payload.to_bytes(), x.shape, x.dtype)
        assert torch.equal(c.decompress(parsed), c.decompress(payload)), name


# -- config group ----------------------------------------------------------------------------
EXPECTED_PRESETS = {  # preset: (compressor class, with error feedback, with zstd)
    "none": (Identity, False, False), "fp16": (Fp16, False, False), "bf16": (Bf16, False, False),
    "int8": (IntQuantizer, False, False), "int4": (IntQuantizer, False, False),
    "fp4_e2m1": (FP4Quantizer, False, False), "fp4_e3m0": (FP4Quantizer, False, False),
    "sign": (SignQuantizer, False, False), "topk": (TopK, False, False), "topk_ef": (TopK, True, False),
    "randomk": (RandomK, False, False), "powersgd": (PowerSGD, True, False), "int8_zstd": (IntQuantizer, False, True)}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_every_preset_builds_its_compressor(preset):
    cfg = CompressionConfig(**yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text()))
    cfg.validate()
    c = cfg.build(rank=1)
    with_zstd = isinstance(c, Zstd)
    c = c.inner if with_zstd else c
    with_ef = isinstance(c, ErrorFeedback)
    c = c.inner if with_ef else c
    assert (type(c), with_ef, with_zstd) == EXPECTED_PRESETS[preset]


def test_presets_cover_every_yaml_file():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_PRESETS)


def test_none_is_exact_full_precision():
    x = sample((3, 5, 77), torch.float32)
    assert torch.equal(CompressionConfig("none").build().decompress(CompressionConfig("none").build().compress(x)), x)


@pytest.mark.parametrize("fields,message", [
    ({"name": "int", "bits": 9}, "compression.bits=9: must be one of [2, 3, 4, 5, 6, 7, 8]"),
    ({"name": "powersgd", "rank": 0}, "compression.rank=0: must be an integer >= 1"),
    ({"name": "gzip"}, "compression.name='gzip': unknown compressor"),
    ({"name": "topk", "ratio": 1.5}, "compression.ratio=1.5: must be a number in (0, 1]"),
    ({"name": "fp4", "format": "e4m3"}, "compression.format='e4m3': must be one of ['e2m1', 'e3m0']"),
    ({"name": "int", "block_size": 0}, "compression.block_size=0: must be an integer >= 1"),
    ({"name": "topk", "bits": 8}, "compression.bits=8: compressor 'topk' does not take it"),
    ({"name": "int", "zstd_level": 40}, "compression.zstd_level=40: must be an integer in [1, 22]"),
    ({"name": "int", "stochastic": "yes"}, "compression.stochastic='yes': must be one of [False, True]"),
])
def test_config_errors_are_one_line_and_name_the_key(fields, message):
    with pytest.raises(ValueError) as err:
        CompressionConfig(**fields).validate()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_registry_rejects_duplicate_names():
    with pytest.raises(ValueError, match="'int' is already registered"):
        register_compressor("int", IntQuantizer)


def test_build_offsets_rounding_seed_by_rank_but_not_random_positions():
    sr = CompressionConfig("int", bits=4, stochastic=True, seed=3)
    assert sr.build(rank=0)._rngs.seed == 3 and sr.build(rank=2)._rngs.seed == 5
    assert CompressionConfig("randomk", seed=3).build(rank=2).seed == 3
