"""The 2-bit level L-GreCo may choose (raylane.comm.quantizers.Int2Quantizer): exact bytes, the
nearest level of the absmax-scaled 4-level grid, bits that survive the wire, lgreco's byte formula."""

import pytest
import torch

from raylane.comm import quant
from raylane.comm.quantizers import Int2Quantizer
from raylane.strategies.blocks.compression_plan.levels import compressor, family, wire_bytes

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("n", [1, 3, 128, 130, 1001])
def test_int2_payload_is_a_quarter_byte_per_value_plus_one_fp32_scale_per_block(n):
    c = Int2Quantizer(128)
    t = torch.randn(n, generator=torch.Generator().manual_seed(n))
    payload = c.compress(t)
    expected = -(-n // 4) + 4 * -(-n // 128)
    assert payload.nbytes == c.payload_bytes((n,), torch.float32) == expected
    wire = c.from_bytes(payload.to_bytes(), (n,), torch.float32)
    assert torch.equal(c.decompress(wire), c.decompress(payload))


def test_int2_reconstruction_is_the_nearest_level_of_the_absmax_scaled_grid():
    c, block = Int2Quantizer(64), 64
    t = torch.randn(10 * block, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 5, 10 * block)
    got = c.decompress(c.compress(t)).view(-1, block)
    x = t.view(-1, block)
    scale = x.abs().amax(dim=1, keepdim=True) / 3
    levels = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    nearest = levels[(x.unsqueeze(-1) / scale.unsqueeze(-1) - levels).abs().argmin(dim=-1)]
    torch.testing.assert_close(got, nearest * scale, rtol=1e-6, atol=0)
    assert ((got - x).abs() <= scale * (1 + 1e-6)).all()  # at most one scale off
    torch.testing.assert_close(got.abs().amax(dim=1), x.abs().amax(dim=1), rtol=1e-6, atol=0)  # absmax kept


def test_int2_keeps_zero_blocks_zero_and_its_stochastic_rounding_is_unbiased():
    t = torch.cat([torch.zeros(128), torch.linspace(-1, 1, 128)])
    assert torch.equal(Int2Quantizer(128).decompress(Int2Quantizer(128).compress(t))[:128], torch.zeros(128))
    c = Int2Quantizer(128, stochastic=True, seed=4)
    mean = torch.stack([c.decompress(c.compress(t)) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, t, rtol=0, atol=0.05)  # 4000 draws: sd of the mean < 0.011


def test_crumbs_pack_four_codes_per_byte_and_unpack_to_the_same_codes():
    codes = torch.randint(0, 4, (1003,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = quant.pack_crumbs(codes)
    assert packed.numel() == 251 and torch.equal(quant.unpack_crumbs(packed, 1003), codes)
    assert quant.pack_crumbs(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)).item() == 1 | 2 << 2 | 3 << 4


def test_int2_is_a_quant_level_whose_wire_bytes_follow_the_quantized_allreduce():
    assert family("int:2:128") == "quant" and compressor("int:2:128").name == "int2"
    shape, world, n = (256, 64), 4, 256 * 64  # four chunks of 4096 values, 32 blocks of 128 each
    assert wire_bytes("int:2:128", shape, world) == 2 * (world - 1) * (n // 4 + 4 * n // 128)
    ratio = wire_bytes("int:2:128", shape, world) / wire_bytes("int:4:128", shape, world)
    assert ratio == pytest.approx(0.5294, abs=1e-4)
