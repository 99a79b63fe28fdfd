"""The bodies of the compressed collectives, on the Communicator's reusable buffers.

Same results, bit for bit, and the same bytes as the straightforward versions kept in
tests/_reference_comm/collectives.py (checked by tests/test_fast_collectives.py), with fewer passes
and no tensor allocated at the data's size per call where the compressor allows:

quantized allreduce, chunk j of the flat tensor reduced by rank j:
1. every chunk's payload encoded straight into its slot of one flat send buffer ("qar.send");
2. one flat alltoall into "qar.recv" (no concatenation, no copy-out);
3. the W payloads of this rank's chunk decoded and summed, in rank order, into one fp32
   accumulator ("qar.acc"); avg divides it by W;
4. the sum requantized into this rank's slot of the send buffer, copied to the other W-1 slots;
5. one flat alltoall of the owners' payloads; each decoded straight into the caller's tensor.

Int / fp4 quantizers on fp32 go through `BlockCodec` (fused kernels, no per-call allocation at the
data's size). Other chunkable fixed-size compressors (casts, sign, sparsifiers, stochastic fp4,
error feedback, 16-bit inputs) use their own compress / decompress, still through the same buffers.
Buffers per Communicator, for N values of b bytes in W chunks, c payload bytes per value:
send and recv max(N c, W * N c / W) each, acc 4 N / W, plus the eager kernels' scratch
(8 N / W) when torch.compile is off or the tensor is small.
Large tensors on the BlockCodec path are pipelined in stages (`raylane.comm.pipeline`): same bits,
same payload bytes, more messages.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from raylane.comm import pipeline
from raylane.comm.blockcodec import BlockCodec
from raylane.comm.communicator import Communicator
from raylane.comm.compressors import Compressor


def chunk_ranges(numel: int, world: int, align: int) -> list[tuple[int, int]]:
    """[start, end) element range of each rank's chunk: whole blocks of `align`, spread evenly."""
    blocks = -(-numel // align)
    bounds = [min(numel, (blocks * j // world) * align) for j in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def sum_fp32(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum in fp32, in order, taking one tensor at a time (a generator keeps one decompressed at once)."""
    acc = None
    for t in tensors:
        acc = t.float().clone() if acc is None else acc.add_(t.float())
    return acc


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


class _Generic:
    """Any chunkable fixed-size compressor, through its own compress / decompress."""

    def __init__(self, c: Compressor, dtype: torch.dtype):
        self.c, self.dtype = c, dtype

    def encode(self, src: torch.Tensor, buf: torch.Tensor, key: str) -> None:
        buf.copy_(self.c.compress(src, key).to_bytes())

    def decoded(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        return self.c.decompress(self.c.from_bytes(buf, (numel,), self.dtype))


def quantized_allreduce(comm: Communicator, t: torch.Tensor, c: Compressor, op: str, key: str,
                        sent: torch.Tensor | None = None) -> torch.Tensor:
    """`sent` (t's numel, fp32): receives the decode of this rank's own payloads (what it sent of t),
    read back from the send buffer: error feedback's reconstruction, without compressing again."""
    flat, world, rank, ws = t.detach().reshape(-1), comm.world_size, comm.rank, comm.workspace
    ranges = chunk_ranges(flat.numel(), world, c.align)
    sizes = [c.payload_bytes((b - a,), t.dtype) for a, b in ranges]
    lo, hi = ranges[rank]
    fast = BlockCodec(c, ws) if BlockCodec.fits(c, t) else None
    if sent is None and pipeline.applies(fast, t):
        stages = pipeline.stage_count(flat.numel(), ranges, c.block_size)
        if stages > 1:  # large tensors: encoding overlaps the transfer (raylane.comm.pipeline)
            return pipeline.quantized_allreduce(comm, t, fast, op, ranges, stages)
    slow = _Generic(c, t.dtype)

    # 1-2: compressed reduce-scatter
    offs = _offsets(sizes)
    send = ws.get("qar.send", max(offs[-1], world * sizes[rank]), torch.uint8, t.device)
    for j, (a, b) in enumerate(ranges):
        dst = send[offs[j]:offs[j + 1]]
        if fast:
            fast.encode(flat[a:b], dst)
        else:  # empty chunks too, as the reference (stateful compressors count calls per key)
            slow.encode(flat[a:b], dst, f"{key}#{j}")
    recv = ws.get("qar.recv", max(offs[-1], world * sizes[rank]), torch.uint8, t.device)
    comm.alltoall_into(send[:offs[-1]], sizes, recv[:world * sizes[rank]], [sizes[rank]] * world,
                       label="quantized_allreduce.reduce_scatter")
    if sent is not None:
        _decode_sent(sent.reshape(-1), ranges, offs, send, fast, slow)

    # 3: reduce this rank's chunk in fp32
    m, mine = hi - lo, sizes[rank]
    if fast:
        acc = ws.get("qar.acc", m, torch.float32, t.device)
        for j in range(world):
            fast.decode(recv[j * mine:(j + 1) * mine], m, acc, accumulate=j > 0)
    else:
        acc = sum_fp32(slow.decoded(recv[j * mine:(j + 1) * mine], m) for j in range(world))
    if op == "avg":
        acc /= world

    # 4-5: requantize, allgather the owners' payloads, decode into t
    back = send[:world * mine]
    own = back[rank * mine:(rank + 1) * mine]
    if fast:
        fast.encode(acc, own)
    else:
        own.copy_(c.compress(acc.to(t.dtype), f"{key}#{rank}/ag").to_bytes())
    for j in range(world):
        if j != rank:
            back[j * mine:(j + 1) * mine].copy_(own)
    comm.alltoall_into(back, [mine] * world, recv[:offs[-1]], sizes, label="quantized_allreduce.allgather")
    _write_back(t, flat, ranges, offs, recv, fast, slow, ws)
    return t


def _decode_sent(out: torch.Tensor, ranges, offs, send: torch.Tensor, fast: BlockCodec | None, slow: _Generic) -> None:
    with torch.no_grad():
        for j, (a, b) in enumerate(ranges):
            if fast:
                fast.decode(send[offs[j]:offs[j + 1]], b - a, out[a:b], accumulate=False)
            else:
                out[a:b].copy_(slow.decoded(send[offs[j]:offs[j + 1]], b - a))


def _write_back(t, flat, ranges, offs, recv, fast: BlockCodec | None, slow: _Generic, ws) -> None:
    """Decode every owner's payload straight into t (or, if t is not contiguous, via one buffer)."""
    if fast is None and not t.is_contiguous():
        parts = [slow.decoded(recv[offs[j]:offs[j + 1]], b - a) for j, (a, b) in enumerate(ranges)]
        with torch.no_grad():
            t.copy_(torch.cat(parts).view(t.shape))
        return
    out = flat if t.is_contiguous() else ws.get("qar.out", flat.numel(), torch.float32, t.device)
    with torch.no_grad():
        for j, (a, b) in enumerate(ranges):
            buf = recv[offs[j]:offs[j + 1]]
            if fast:
                fast.decode(buf, b - a, out[a:b], accumulate=False)
            else:
                out[a:b].copy_(slow.decoded(buf, b - a))
        if out is not flat:
            t.copy_(out.view(t.shape))


# -- compressed allgather, reduced ------------------------------------------------------------
def sparse_parts(c: Compressor, buf: torch.Tensor, numel: int, dtype: torch.dtype, positions: dict):
    """(indices, values) of a top-k / random-k payload, or None for other compressors."""
    from raylane.comm.sparse import RandomK, TopK

    if type(c) is TopK:
        parts = c.from_bytes(buf, (numel,), dtype).parts
        return parts["indices"], parts["values"]
    if type(c) is RandomK:
        parts = c.from_bytes(buf, (numel,), dtype).parts
        seed = int(parts["seed"].item())
        if seed not in positions:  # ranks that share keys share seeds: one permutation per call
            positions[seed] = c.positions(seed, numel, buf.device)
        return positions[seed], parts["values"]
    return None


def _payload(c: Compressor, t: torch.Tensor, key: str, ws) -> torch.Tensor:
    """c.compress(t, key).to_bytes(); top-k on fp32 takes |t| and its candidate mask in reused buffers."""
    from raylane.comm.compressors import Payload, check_input
    from raylane.comm.sparse import TopK

    if type(c) is not TopK or t.dtype != torch.float32 or not t.is_contiguous():
        return c.compress(t, key).to_bytes()
    check_input(c.name, t)
    flat, n = t.detach().view(-1), t.numel()
    mags = torch.abs(flat, out=ws.get("cag.mag", n, torch.float32, t.device))
    parts = c.encode_with(flat, mags, ws.get("cag.mask", n, torch.bool, t.device))
    return Payload(parts, t.shape, t.dtype).to_bytes()


def allgather_reduce(comm: Communicator, t: torch.Tensor, c: Compressor, op: str, key: str) -> torch.Tensor:
    """Fixed-size payloads: encode once, W copies in the send buffer, one flat alltoall into the
    receive buffer; top-k / random-k sums are scattered straight into one fp32 accumulator (the
    caller's tensor when it is fp32 and contiguous), others decompressed one at a time."""
    world, ws, n = comm.world_size, comm.workspace, t.numel()
    payload = _payload(c, t, key, ws)
    size = payload.numel()
    send = ws.get("cag.send", world * size, torch.uint8, t.device)
    for j in range(world):
        send[j * size:(j + 1) * size].copy_(payload)
    recv = ws.get("cag.recv", world * size, torch.uint8, t.device)
    comm.alltoall_into(send, [size] * world, recv, [size] * world, label="compressed_allgather.payloads")
    slots = [recv[j * size:(j + 1) * size] for j in range(world)]
    direct = t.dtype == torch.float32 and t.is_contiguous()
    acc = t.detach().view(-1) if direct else ws.get("cag.acc", n, torch.float32, t.device)
    positions: dict = {}
    sparse = [sparse_parts(c, s, n, t.dtype, positions) for s in slots] if n else [None]
    with torch.no_grad():
        if sparse[0] is not None and not _has_negative_zero(sparse[0][1]):
            acc.zero_()
            for j, (index, values) in enumerate(sparse):
                if j == 0:
                    acc[index.long()] = values.float()
                else:
                    acc.index_add_(0, index.long(), values.float())
        else:  # dense, as the reference: + 0.0 everywhere turns a running -0.0 into +0.0
            acc.copy_(sum_fp32(c.decompress(c.from_bytes(s, t.shape, t.dtype)) for s in slots).view(-1))
        if op == "avg":
            acc /= world
        if not direct:
            t.copy_(acc.view(t.shape))
    return t


def _has_negative_zero(values: torch.Tensor) -> bool:
    """Rank 0's kept values: a -0.0 among them is the one case a sparse sum differs from a dense one."""
    return bool((torch.signbit(values) & (values == 0)).any())
