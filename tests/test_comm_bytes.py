"""The Communicator's byte counts equal what Gloo's algorithms really write to sockets.

Measured from /proc/self/io `wchar` (bytes passed to write/writev) around one call;
Gloo adds a 48-byte header to each message sent and each receive posted
(`wire.GLOO_HEADER_BYTES`): measured = payload + 48 · (2 · messages_sent + messages_recv).
"""

import pytest
import torch

from raylane.comm import wire

pytestmark = pytest.mark.timeout(120)


def _wchar() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar")


def _measure_allreduce(comm, numel, dtype):
    t = torch.ones(numel, dtype=dtype)
    comm.allreduce(t)  # warm up the pairs
    before_stats, before = comm.stats.total().bytes_sent, _wchar()
    comm.allreduce(t)
    measured = _wchar() - before
    counted = comm.stats.total().bytes_sent - before_stats
    msgs = comm.stats.ops["allreduce"].messages_sent // 2, comm.stats.ops["allreduce"].messages_recv // 2
    return measured, counted, msgs, t[0].item()


def _measure_broadcast(comm, numel, src):
    t = torch.full((numel,), float(comm.rank))
    comm.broadcast(t, src=src)  # warm up the pairs
    before_stats, before = comm.stats.total(), _wchar()
    comm.broadcast(t, src=src)
    after = comm.stats.total()
    msgs = after.messages_sent - before_stats.messages_sent, after.messages_recv - before_stats.messages_recv
    return _wchar() - before, after.bytes_sent - before_stats.bytes_sent, msgs, t[0].item()


@pytest.mark.parametrize("world,numel,dtype", [(4, 1_000_000, torch.float32), (3, 1001, torch.float32),
                                               (4, 12_345, torch.bfloat16), (2, 7, torch.float32),
                                               # above 2W MiB, Gloo caps segments at 1 MiB: more messages
                                               (2, 3_000_001, torch.float32), (3, 5_000_001, torch.bfloat16)])
def test_allreduce_bytes_counted_equal_gloo_bytes_written(world, numel, dtype):
    from tests.multiproc import run_ranks

    for rank, (measured, counted, (sent_msgs, recv_msgs), value) in enumerate(
            run_ranks(_measure_allreduce, world, numel, dtype)):
        assert value == world ** 2  # one warm-up allreduce, then a second
        assert counted == wire.gloo_allreduce(numel * torch.tensor([], dtype=dtype).element_size(),
                                              torch.tensor([], dtype=dtype).element_size(), world, rank).bytes_sent
        assert measured == counted + wire.GLOO_HEADER_BYTES * (2 * sent_msgs + recv_msgs), rank


def test_gloo_allreduce_caps_segments_at_one_mib():
    small, big = wire.gloo_allreduce(4 << 20, 4, 4, 0), wire.gloo_allreduce(64 << 20, 4, 4, 0)
    assert small.messages_sent == 2 * (8 - 2)  # 2W = 8 segments of 512 KiB
    assert big.messages_sent == 2 * (64 - 16)  # 64 segments of 1 MiB
    assert big.bytes_sent == 2 * 3 * (64 << 20) // 4


def test_allreduce_bytes_follow_ring_formula_when_divisible():
    n, w = 4 * 2 * 1024, 4  # divisible into 2W segments
    for r in range(w):
        assert wire.gloo_allreduce(n * 4, 4, w, r).bytes_sent == 2 * (w - 1) * n * 4 // w


def _gloo_tree_children(vrank: int, world: int) -> list[int]:
    """Gloo's broadcast (gloo/broadcast.cc), replayed: in round i a virtual rank with no bit above i
    sends to vrank + 2^i when its bit i is 0. Independent of wire.binomial_children."""
    dim = (world - 1).bit_length()
    return [vrank + (1 << i) for i in range(dim)
            if vrank >> (i + 1) == 0 and not vrank & (1 << i) and vrank + (1 << i) < world]


@pytest.mark.parametrize("world,src", [(5, 3)])  # children per rank 3, 1, 0, 0, 0: root, inner node, leaves
def test_broadcast_bytes_counted_equal_gloo_bytes_written_per_rank(world, src):
    """Each rank writes exactly its children's copies plus Gloo's headers: the root and every inner
    node of the binomial tree C per child, the leaves only the header of their one posted receive."""
    from tests.multiproc import run_ranks

    numel, nbytes = 50_000, 200_000
    for rank, (measured, counted, (sent_msgs, recv_msgs), value) in enumerate(
            run_ranks(_measure_broadcast, world, numel, src)):
        children = len(_gloo_tree_children((rank - src) % world, world))
        assert value == float(src)
        assert counted == children * nbytes == wire.gloo_broadcast(nbytes, world, rank, src).bytes_sent, rank
        assert (sent_msgs, recv_msgs) == (children, 0 if rank == src else 1), rank
        assert measured == counted + wire.GLOO_HEADER_BYTES * (2 * sent_msgs + recv_msgs), (rank, measured)


def test_wire_broadcast_tree_matches_gloo_replay_for_every_rank():
    for world in range(2, 34):
        for src in (0, world // 2):
            for rank in range(world):
                children = _gloo_tree_children((rank - src) % world, world)
                assert wire.binomial_children(rank, src, world) == len(children), (world, src, rank)
        received = sorted(c for v in range(world) for c in _gloo_tree_children(v, world))
        assert received == list(range(1, world))  # every non-root vrank is sent to exactly once
