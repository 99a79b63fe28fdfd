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


def _measure_broadcast(comm, numel):
    t = torch.full((numel,), float(comm.rank))
    comm.broadcast(t, src=1)
    before_stats, before = comm.stats.total().bytes_sent, _wchar()
    comm.broadcast(t, src=1)
    return _wchar() - before, comm.stats.total().bytes_sent - before_stats, t[0].item()


@pytest.mark.parametrize("world,numel,dtype", [(4, 1_000_000, torch.float32), (3, 1001, torch.float32),
                                               (4, 12_345, torch.bfloat16), (2, 7, torch.float32)])
def test_allreduce_bytes_counted_equal_gloo_bytes_written(world, numel, dtype):
    from tests.multiproc import run_ranks

    for rank, (measured, counted, (sent_msgs, recv_msgs), value) in enumerate(
            run_ranks(_measure_allreduce, world, numel, dtype)):
        assert value == world ** 2  # one warm-up allreduce, then a second
        assert counted == wire.gloo_allreduce(numel * torch.tensor([], dtype=dtype).element_size(),
                                              torch.tensor([], dtype=dtype).element_size(), world, rank).bytes_sent
        assert measured == counted + wire.GLOO_HEADER_BYTES * (2 * sent_msgs + recv_msgs), rank


def test_allreduce_bytes_follow_ring_formula_when_divisible():
    n, w = 4 * 2 * 1024, 4  # divisible into 2W segments
    for r in range(w):
        assert wire.gloo_allreduce(n * 4, 4, w, r).bytes_sent == 2 * (w - 1) * n * 4 // w


def test_broadcast_bytes_counted_equal_gloo_bytes_written():
    from tests.multiproc import run_ranks

    for measured, counted, value in run_ranks(_measure_broadcast, 4, 50_000):
        assert value == 1.0
        assert measured - counted in (wire.GLOO_HEADER_BYTES * k for k in range(0, 8))
        assert counted in (0, 200_000, 400_000)
