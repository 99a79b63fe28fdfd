"""Pipelined quantized allreduce (raylane.comm.pipeline): on every rank, the same bits as the unpipelined
path and the same payload bytes (the formula), S times the messages; Gloo writes exactly the counted
payload plus its per-message headers; the config switch validates and sets the stage size."""

import hashlib
import io

import pytest
import torch

from raylane.comm import CompressionConfig, kernels, pipeline
from raylane.comm.collectives import chunk_ranges, expected_bytes_sent, quantized_allreduce
from raylane.comm.quantizers import FP4Quantizer, IntQuantizer
from tests.test_collectives import _measured
from tests.test_compressors import sample

pytestmark = pytest.mark.timeout(180)

STAGE = 100  # floats per stage: small tensors get many stages, some runs empty (600 floats, W = 3)


def _cases() -> dict:
    return {"int8": lambda: IntQuantizer(8, 64), "int4": lambda: IntQuantizer(4, 32),
            "fp4_e2m1": lambda: FP4Quantizer("e2m1", 64), "fp4_e3m0": lambda: FP4Quantizer("e3m0", 16)}


def _input(numel: int, rank: int) -> torch.Tensor:
    x = sample((numel,), torch.float32, rank)
    x[:70] = 0.0
    x[70:90:2] = -0.0
    return x


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _battery(comm) -> bytes:
    out = {}
    kernels.configure(compile=False)  # eager kernels: runs this small would not take the compiled ones
    try:
        for name, make in _cases().items():
            for numel in (4099, 1000, 600):  # partial last block; 600: fewer blocks per chunk than stages
                for op in ("sum", "avg"):
                    x = _input(numel, comm.rank)
                    pipeline.configure(pipeline_floats=0)
                    before = comm.stats.total().messages_sent
                    plain, plain_bytes, _ = _measured(comm, lambda: quantized_allreduce(comm, x.clone(), make(), op))
                    plain_msgs = comm.stats.total().messages_sent - before
                    pipeline.configure(pipeline_floats=STAGE)
                    before = comm.stats.total()
                    piped, piped_bytes, socket = _measured(comm, lambda: quantized_allreduce(comm, x.clone(), make(), op))
                    msgs = comm.stats.total().messages_sent - before.messages_sent
                    c = make()
                    stages = pipeline.stage_count(numel, chunk_ranges(numel, comm.world_size, c.align), c.block_size)
                    out[name, numel, op] = {
                        "same_bits": _digest(plain) == _digest(piped), "digest": _digest(piped),
                        "bytes": (plain_bytes, piped_bytes, socket,
                                  expected_bytes_sent("quantized_allreduce", (numel,), torch.float32, comm.world_size,
                                                      comm.rank, c)),
                        "msgs": (plain_msgs, msgs, stages)}
    finally:
        pipeline.configure(pipeline_floats=pipeline.DEFAULT_FLOATS)
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.mark.parametrize("world", [2, 3])
def test_pipelined_quantized_allreduce_equals_unpipelined_bits_and_bytes_on_every_rank(world):
    from tests.multiproc import run_ranks

    ranks = [torch.load(io.BytesIO(b)) for b in run_ranks(_battery, world, timeout_s=150)]
    for case, first in ranks[0].items():
        for r, rank in enumerate(ranks):
            got = rank[case]
            assert got["same_bits"], f"rank {r} {case}: pipelined result differs from unpipelined"
            assert got["digest"] == first["digest"], f"rank {r} {case}: differs from rank 0"
            plain, piped, socket, formula = got["bytes"]
            assert plain == piped == socket == formula, f"rank {r} {case}: bytes {got['bytes']}"
            plain_msgs, msgs, stages = got["msgs"]
            assert stages > 2, case  # the case really is pipelined
            assert plain_msgs == 2 * (world - 1) and msgs == stages * plain_msgs, (r, case, got["msgs"])


def test_stage_runs_are_whole_blocks_that_tile_each_chunk():
    ranges = chunk_ranges(4099, 3, 64)
    runs = pipeline.runs(ranges, 64, 5)
    for j, (a, b) in enumerate(ranges):
        mine = [row[j] for row in runs]
        assert mine[0][0] == a and mine[-1][1] == b
        assert all(x[1] == y[0] for x, y in zip(mine, mine[1:]))
        assert all((lo - a) % 64 == 0 for lo, _ in mine)


def test_stage_count_is_one_when_off_or_small_and_capped_by_blocks_and_compiled_run_size():
    ranges = chunk_ranges(10_000, 2, 64)
    try:
        kernels.configure(compile=True, min_numel=1_000)
        pipeline.configure(pipeline_floats=1_000)
        assert pipeline.stage_count(10_000, ranges, 64) == 5  # runs of >= 1,000 values per rank
        kernels.configure(compile=False)
        assert pipeline.configure(pipeline_floats=0)["pipeline_floats"] == 0
        assert pipeline.stage_count(10_000, ranges, 64) == 1
        pipeline.configure(pipeline_floats=6_000)
        assert pipeline.stage_count(10_000, ranges, 64) == 1  # fewer than 2 stages' worth
        pipeline.configure(pipeline_floats=1_000)
        assert pipeline.stage_count(10_000, ranges, 64) == 10
        pipeline.configure(pipeline_floats=1)
        assert pipeline.stage_count(10_000, ranges, 64) == 79  # blocks in the larger chunk
    finally:
        pipeline.configure(pipeline_floats=pipeline.DEFAULT_FLOATS)
        kernels.configure(compile=True, min_numel=1 << 20)


def test_compression_config_sets_and_validates_pipeline_floats():
    try:
        CompressionConfig(name="int", pipeline_floats=1234).build()
        assert pipeline.configure()["pipeline_floats"] == 1234
        for bad in (-1, 1.5, True, "4"):
            with pytest.raises(ValueError, match=r"^compression\.pipeline_floats="):
                CompressionConfig(name="int", pipeline_floats=bad).validate()
    finally:
        pipeline.configure(pipeline_floats=pipeline.DEFAULT_FLOATS)
