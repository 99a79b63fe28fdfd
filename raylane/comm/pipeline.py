"""Pipelined quantized allreduce: encoding of stage s+1 overlaps the transfer of stage s.

For large tensors on the `BlockCodec` path (int / fp4, nearest rounding, fp32, contiguous), the
quantized allreduce of `raylane.comm.fast_paths` is cut into S stages. Rank j's chunk (the same
`chunk_ranges` as unpipelined) is split into S runs of whole blocks; stage s is the s-th run of every
chunk. Per stage: encode the runs into the send buffer and issue the reduce-scatter alltoall async
(on the same Communicator); while it is in flight, the previous stage is reduced, requantized and its
allgather issued async, and the stage before that decoded into the caller's tensor. Every rank
issues the alltoalls in the same order (rs0, rs1, ag0, rs2, ag1, ...).

Same bits as unpipelined: quantization is blockwise and runs start on block boundaries; each value is
summed in fp32 in rank order by its chunk's owner, as before. Same payload bytes per rank: the runs'
payloads of a chunk add up to the chunk's payload (whole blocks; 4-bit codes of a run of whole blocks
are a whole number of bytes); S times as many alltoall messages (Gloo adds its per-message header to
each, `wire.GLOO_HEADER_BYTES`).

Switch: `configure(pipeline_floats=N)`, also `CompressionConfig.pipeline_floats`: a stage holds about
N floats of the tensor (over all chunks); 0 turns pipelining off. Default off (`DEFAULT_FLOATS`), env
RAYLANE_COMM_PIPELINE_FLOATS overrides. Measured (docs/ARCHITECTURE.md, 4 ranks on 2 cores, 16M
floats): on loopback no gain (int8 0.080 s off, 0.085 s with N = 4M; more under load), through an
emulated 1 Gbit/s link int8 0.247 -> 0.215 s and fp4 0.233 -> 0.164 s: turn it on (N = 4M) for thin links. With torch.compile on, a rank's run per stage is kept at
`kernels.min_compiled_numel()` values or more (the eager kernels are several times slower), e.g.
4 stages for 16M floats on 4 ranks. Tensors of fewer than 2 N floats are not pipelined, nor
stochastic rounding (its noise is drawn per chunk payload in one go), nor the generic path.
Buffers ("qar.send", "qar.recv", "qar.acc" of the Communicator's workspace): send and recv as
unpipelined (a stage's region holds the larger of its two phases), acc one run instead of one chunk.
"""

from __future__ import annotations

import os

import torch

from raylane.comm import kernels
from raylane.comm.blockcodec import BlockCodec, payload_bytes
from raylane.comm.communicator import Communicator

DEFAULT_FLOATS = 0  # off: on a CPU-bound link (loopback, LAN) overlap buys nothing; see below
_SETTINGS = {"pipeline_floats": int(os.environ.get("RAYLANE_COMM_PIPELINE_FLOATS", DEFAULT_FLOATS))}


def configure(pipeline_floats: int | None = None) -> dict:
    """Set the floats per pipeline stage (0: off); returns the settings."""
    if pipeline_floats is not None:
        if int(pipeline_floats) < 0:
            raise ValueError(f"pipeline_floats={pipeline_floats!r}: must be >= 0 (0 turns pipelining off)")
        _SETTINGS["pipeline_floats"] = int(pipeline_floats)
    return dict(_SETTINGS)


def stage_count(numel: int, ranges: list[tuple[int, int]], block: int) -> int:
    """How many stages a tensor of `numel` floats in these chunks gets (1: not pipelined): about one
    per `pipeline_floats`, at most one per block of the largest chunk, and few enough that a run is
    large enough for the compiled kernels (`kernels.min_compiled_numel`) when they are on."""
    per = _SETTINGS["pipeline_floats"]
    if per <= 0 or numel < 2 * per:
        return 1
    most_blocks = max(-(-(b - a) // block) for a, b in ranges)
    compiled_cap = numel // (len(ranges) * kernels.min_compiled_numel())
    return max(1, min(-(-numel // per), most_blocks, compiled_cap))


def applies(codec: BlockCodec | None, t: torch.Tensor) -> bool:
    return codec is not None and t.is_contiguous() and not codec.c.stochastic


def runs(ranges: list[tuple[int, int]], block: int, stages: int) -> list[list[tuple[int, int]]]:
    """runs[s][j]: [start, end) of chunk j's s-th run, whole blocks (the chunk's end may cut the last)."""
    out = []
    for s in range(stages):
        row = []
        for a, b in ranges:
            nb = -(-(b - a) // block)
            lo, hi = nb * s // stages, nb * (s + 1) // stages
            row.append((min(b, a + lo * block), min(b, a + hi * block)))
        out.append(row)
    return out


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


class _Pipeline:
    """One call's state: the runs, their payload sizes, buffer regions and in-flight handles."""

    def __init__(self, comm: Communicator, flat: torch.Tensor, codec: BlockCodec, op: str,
                 ranges: list[tuple[int, int]], stages: int):
        self.comm, self.flat, self.codec, self.op = comm, flat, codec, op
        self.world, self.rank = comm.world_size, comm.rank
        self.runs = runs(ranges, codec.block, stages)
        self.sizes = [[payload_bytes(codec.c, b - a) for a, b in row] for row in self.runs]
        regions = [max(sum(sz), self.world * sz[self.rank]) for sz in self.sizes]
        self.base = _offsets(regions)
        ws, dev = comm.workspace, flat.device
        self.send = ws.get("qar.send", self.base[-1], torch.uint8, dev)
        self.recv = ws.get("qar.recv", self.base[-1], torch.uint8, dev)
        longest = max(b - a for row in self.runs for a, b in [row[self.rank]])
        self.acc = ws.get("qar.acc", longest, torch.float32, dev)
        self.handles: dict[tuple[str, int], object] = {}

    def scatter(self, s: int) -> None:
        """Encode stage s's runs into its send region; issue its reduce-scatter."""
        o, sizes = self.base[s], self.sizes[s]
        offs = _offsets(sizes)
        for j, (a, b) in enumerate(self.runs[s]):
            self.codec.encode(self.flat[a:b], self.send[o + offs[j]:o + offs[j + 1]])
        mine = sizes[self.rank]
        self.handles["rs", s] = self.comm.alltoall_into(
            self.send[o:o + offs[-1]], sizes, self.recv[o:o + self.world * mine], [mine] * self.world,
            async_op=True, label="quantized_allreduce.reduce_scatter")

    def gather(self, s: int) -> None:
        """Wait for stage s's reduce-scatter; reduce this rank's run, requantize, issue its allgather."""
        self.handles.pop(("rs", s)).wait()
        o, sizes, world, rank = self.base[s], self.sizes[s], self.world, self.rank
        lo, hi = self.runs[s][rank]
        m, mine = hi - lo, sizes[rank]
        acc = self.acc[:m]
        for j in range(world):
            self.codec.decode(self.recv[o + j * mine:o + (j + 1) * mine], m, acc, accumulate=j > 0)
        if self.op == "avg":
            acc /= world
        back = self.send[o:o + world * mine]
        own = back[rank * mine:(rank + 1) * mine]
        self.codec.encode(acc, own)
        for j in range(world):
            if j != rank:
                back[j * mine:(j + 1) * mine].copy_(own)
        self.handles["ag", s] = self.comm.alltoall_into(
            back, [mine] * world, self.recv[o:o + sum(sizes)], sizes, async_op=True,
            label="quantized_allreduce.allgather")

    def write_back(self, s: int) -> None:
        """Wait for stage s's allgather; decode every owner's run straight into the tensor."""
        self.handles.pop(("ag", s)).wait()
        o, offs = self.base[s], _offsets(self.sizes[s])
        with torch.no_grad():
            for j, (a, b) in enumerate(self.runs[s]):
                self.codec.decode(self.recv[o + offs[j]:o + offs[j + 1]], b - a, self.flat[a:b], accumulate=False)

    def run(self, stages: int) -> None:
        try:
            self.scatter(0)
            for s in range(1, stages):
                self.scatter(s)
                self.gather(s - 1)
                if s >= 2:
                    self.write_back(s - 2)
            self.gather(stages - 1)
            for s in range(max(0, stages - 2), stages):
                self.write_back(s)
        finally:  # on an error, wait out what is in flight before the buffers are reused
            for handle in self.handles.values():
                try:
                    handle.wait()
                except Exception:  # noqa: BLE001 - the first error is the one raised
                    pass


def quantized_allreduce(comm: Communicator, t: torch.Tensor, codec: BlockCodec, op: str,
                        ranges: list[tuple[int, int]], stages: int) -> torch.Tensor:
    """`fast_paths.quantized_allreduce` in `stages` (>= 2) stages; t fp32 and contiguous."""
    _Pipeline(comm, t.detach().view(-1), codec, op, ranges, stages).run(stages)
    return t
