"""Bytes on the wire: what each backend's collective algorithm sends, per rank.

Every formula here counts payload bytes only. Gloo's TCP transport adds a 48-byte
control header per message it sends and per receive it posts (see
`GLOO_HEADER_BYTES`); `Traffic.messages_*` lets a test add those back and compare
with what the kernel saw.

Gloo (measured against /proc/self/io on this torch, see tests/test_comm_bytes.py):
- allreduce: ring (gloo/allreduce.cc, ring()). The buffer of T bytes is cut into
  S = roundup(max(ceil(T/M), 2W), W) segments, M = `GLOO_MAX_SEGMENT_BYTES` (1 MiB: more,
  smaller messages from T > 2W MiB on; measured, see tests/test_comm_bytes.py), of
  s = roundup(ceil(T/S), b) bytes, W chunks of S/W segments each; rank r
  sends every segment except those of chunk r-1 (reduce-scatter phase) and again every
  segment except those of chunk r (allgather phase); it receives what rank r+1 sends.
  With T divisible by S·b: 2(W-1)/W · N · b.
- allgather: ring, (W-1) · C sent and received.
- broadcast: binomial tree from the root; a rank sends C to each of its children.
- alltoall: (W-1) chunks sent, (W-1) received.
- send/recv: the tensor's bytes.

NCCL: ring algorithms; allreduce 2(W-1)/W · N · b, allgather (W-1) · C,
broadcast a pipelined chain (every rank but the last sends C), alltoall (W-1) chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

GLOO_HEADER_BYTES = 48
GLOO_MAX_SEGMENT_BYTES = 1 << 20  # ring allreduce's largest segment (message) on this torch's Gloo


@dataclass(frozen=True)
class Traffic:
    """Payload bytes and message counts one rank sends and receives in one collective."""

    bytes_sent: int
    bytes_recv: int
    messages_sent: int = 0
    messages_recv: int = 0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _gloo_ring_segments(total_bytes: int, elem_bytes: int, world: int) -> tuple[int, int]:
    max_segment = elem_bytes * max(1, GLOO_MAX_SEGMENT_BYTES // elem_bytes)
    num_segments = _round_up(max(-(-total_bytes // max_segment), 2 * world), world)
    segment_bytes = _round_up(-(-total_bytes // num_segments), elem_bytes)
    return num_segments, segment_bytes


def gloo_allreduce(total_bytes: int, elem_bytes: int, world: int, rank: int) -> Traffic:
    """Exact per-rank traffic of Gloo's ring allreduce (gloo/allreduce.cc, ring())."""
    if world == 1 or total_bytes == 0:
        return Traffic(0, 0)
    num_segments, seg = _gloo_ring_segments(total_bytes, elem_bytes, world)
    per_rank = num_segments // world
    lengths = [max(0, min(seg, total_bytes - j * seg)) for j in range(num_segments)]

    def except_chunk(c: int) -> list[int]:
        skip = set(range((c % world) * per_rank, (c % world + 1) * per_rank))
        return [n for j, n in enumerate(lengths) if j not in skip]

    sent = except_chunk(rank - 1) + except_chunk(rank)
    recv = except_chunk(rank) + except_chunk(rank + 1)
    return Traffic(sum(sent), sum(recv), sum(1 for n in sent if n > 0), sum(1 for n in recv if n > 0))


def ring_allreduce(total_bytes: int, world: int) -> Traffic:
    """Textbook ring allreduce (NCCL): 2(W-1)/W · N · b each way."""
    n = (2 * (world - 1) * total_bytes) // world if world > 1 else 0
    return Traffic(n, n, 2 * (world - 1), 2 * (world - 1))


def allgather(chunk_bytes: int, world: int) -> Traffic:
    """Ring allgather: (W-1) · C sent and received by every rank, each chunk in 2 messages (Gloo)."""
    n = (world - 1) * chunk_bytes
    return Traffic(n, n, 2 * (world - 1), 2 * (world - 1))


def alltoall(chunk_bytes_out: list[int], chunk_bytes_in: list[int], rank: int) -> Traffic:
    """Pairwise exchange: every chunk but one's own goes out, every peer's chunk comes in."""
    sent = sum(n for j, n in enumerate(chunk_bytes_out) if j != rank)
    recv = sum(n for j, n in enumerate(chunk_bytes_in) if j != rank)
    peers = len(chunk_bytes_out) - 1
    return Traffic(sent, recv, peers, peers)


def binomial_children(rank: int, src: int, world: int) -> int:
    """How many ranks this rank forwards to in a binomial-tree broadcast rooted at src."""
    v = (rank - src) % world
    k = v.bit_length() if v else 0
    children = 0
    while v + (1 << k) < world:
        children += 1
        k += 1
    return children


def gloo_broadcast(nbytes: int, world: int, rank: int, src: int) -> Traffic:
    """Gloo broadcast: binomial tree; the root receives nothing."""
    children = binomial_children(rank, src, world)
    got = 0 if rank == src else nbytes
    return Traffic(children * nbytes, got, children, 1 if got else 0)


def chain_broadcast(nbytes: int, world: int, rank: int, src: int) -> Traffic:
    """NCCL broadcast: a pipelined chain from the root; the last rank only receives."""
    pos = (rank - src) % world
    sent = nbytes if pos < world - 1 else 0
    got = nbytes if pos > 0 else 0
    return Traffic(sent, got, 1 if sent else 0, 1 if got else 0)
