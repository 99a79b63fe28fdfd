"""Compressed collectives over a Communicator, and the bytes they should send.

- `quantized_allreduce`: compressed reduce-scatter (alltoall of chunk payloads), dequantize and
  reduce in fp32, requantize, allgather of the owners' payloads. Every rank decompresses the
  same gathered payloads (the owner too), so every rank ends with the same bits.
- `compressed_allgather`: every rank's payload to every rank; variable-size payloads (zstd)
  first exchange their sizes. Optionally reduces the decompressed tensors (rank order, fp32).
- `powersgd_allreduce`: PowerSGD across ranks, two allreduces (P, then Q) for a list of matrices.

The bodies live in `raylane.comm.fast_paths`: buffers kept per Communicator, payloads encoded into
and decoded out of flat buffers, fused int/fp4 kernels; bit-identical to the straightforward code
kept in tests/_reference_comm.

Each has `async_op`: False returns the result; True returns a `CollectiveHandle` to `wait()` on.
The work runs on one background thread per Communicator, in call order, so every rank issues
the underlying ops in the same order: while one is in flight, issue further collectives on that
Communicator through this module (they queue behind it), not on the Communicator directly.
The Communicator counts the bytes under "<collective>.<phase>" op names; `expected_bytes_sent`
gives the same numbers from the compressors' formulas. Failures (a peer died, a timeout, inf or
nan input) raise from the call, or from `wait()`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from raylane.comm import fast_paths, wire
from raylane.comm.communicator import Communicator
from raylane.comm.compressors import Compressor, ShapeLike, as_shape, check_choice, check_input
from raylane.comm.error_feedback import ErrorFeedback
from raylane.comm.fast_paths import chunk_ranges, sum_fp32 as _sum_fp32
from raylane.comm.powersgd import PowerSGD, matrix_shape, orthonormalize

_WORKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WORKERS_LOCK = threading.Lock()
SIZE_BYTES = 8  # one int64 per variable-size payload


class CollectiveHandle:
    """An in-flight compressed collective; `wait()` returns its result or raises its error."""

    def __init__(self, future: Future):
        self._future = future

    def wait(self) -> Any:
        return self._future.result()

    def is_completed(self) -> bool:
        return self._future.done()


def _run(comm: Communicator, fn: Callable[[], Any], async_op: bool) -> Any:
    """Run fn on comm's worker thread; on GPU, on the caller's current stream (ordered after its kernels)."""
    stream = torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def on_stream() -> Any:
        if stream is None:
            return fn()
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            return fn()
    with _WORKERS_LOCK:
        worker = _WORKERS.get(comm)
        if worker is None:
            worker = _WORKERS[comm] = ThreadPoolExecutor(1, thread_name_prefix="raylane-collectives")
    future = worker.submit(on_stream)
    return CollectiveHandle(future) if async_op else future.result()


def _check_chunkable(compressor: Compressor) -> None:
    if not (compressor.chunkable and compressor.fixed_size):
        raise ValueError(f"quantized_allreduce: compressor {compressor!r} must be chunkable with fixed-size "
                         "payloads; use compressed_allgather (zstd) or powersgd_allreduce (powersgd)")


# -- quantized allreduce -------------------------------------------------------------------
def quantized_allreduce(comm: Communicator, t: torch.Tensor, compressor: Compressor, op: str = "avg",
                        key: str = "", async_op: bool = False, sent: torch.Tensor | None = None) -> Any:
    """Reduce `t` (in place) over ranks through `compressor`; returns `t`. op: sum | avg.

    Chunk j (element range aligned to the compressor's blocks) is reduced by rank j. Keys
    "{key}#{j}" (sending) and "{key}#{j}/ag" (owner's requantization) carry per-chunk state.
    `sent` (fp32, t's numel): filled with the decode of this rank's own payloads, what it sent of
    `t` (for error feedback kept by the caller); such calls are not pipelined.
    """
    check_choice("op", op, ["avg", "sum"])
    _check_chunkable(compressor)
    if sent is not None and (sent.numel() != t.numel() or sent.dtype != torch.float32 or not sent.is_contiguous()):
        raise ValueError(f"quantized_allreduce: sent must be a contiguous fp32 tensor of {t.numel()} values")
    return _run(comm, lambda: _quantized_allreduce(comm, t, compressor, op, key, sent), async_op)


def _quantized_allreduce(comm: Communicator, t: torch.Tensor, c: Compressor, op: str, key: str,
                         sent: torch.Tensor | None = None) -> torch.Tensor:
    return fast_paths.quantized_allreduce(comm, t, c, op, key, sent)


# -- compressed allgather ------------------------------------------------------------------
def compressed_allgather(comm: Communicator, t: torch.Tensor, compressor: Compressor, op: str | None = None,
                         key: str = "", async_op: bool = False) -> Any:
    """Every rank's `t` through `compressor` (same shape and dtype on every rank).

    op None: the decompressed tensors, by rank. op sum | avg: their fp32 reduction in rank order,
    written into `t` (the same bits on every rank); returns `t`.
    """
    check_choice("op", op, [None, "avg", "sum"])
    return _run(comm, lambda: _compressed_allgather(comm, t, compressor, op, key), async_op)


def _compressed_allgather(comm: Communicator, t: torch.Tensor, c: Compressor, op: str | None, key: str) -> Any:
    if op is not None and c.fixed_size:
        return fast_paths.allgather_reduce(comm, t, c, op, key)
    buf, world = c.compress(t, key).to_bytes().to(t.device), comm.world_size
    if c.fixed_size:
        sizes = [c.payload_bytes(t.shape, t.dtype)] * world
    else:
        mine = torch.tensor([buf.numel()], dtype=torch.int64, device=t.device)
        got_sizes = comm.alltoall([mine] * world, label="compressed_allgather.sizes")
        sizes = [int(s.item()) for s in got_sizes]
    got = comm.alltoall([buf] * world, [torch.Size([s]) for s in sizes], label="compressed_allgather.payloads")
    if op is None:
        return [c.decompress(c.from_bytes(b, t.shape, t.dtype)) for b in got]
    acc = _sum_fp32(c.decompress(c.from_bytes(b, t.shape, t.dtype)) for b in got)
    if op == "avg":
        acc /= world
    with torch.no_grad():
        t.copy_(acc)
    return t


# -- PowerSGD allreduce --------------------------------------------------------------------
def _powersgd_parts(compressor: Compressor) -> tuple[PowerSGD, ErrorFeedback | None]:
    if isinstance(compressor, ErrorFeedback) and isinstance(compressor.inner, PowerSGD):
        return compressor.inner, compressor
    if isinstance(compressor, PowerSGD):
        return compressor, None
    raise ValueError(f"powersgd_allreduce: compressor {compressor!r}: must be powersgd, with or without "
                     "error feedback")


def powersgd_allreduce(comm: Communicator, tensors: Sequence[torch.Tensor], compressor: Compressor,
                       op: str = "avg", key: str = "", async_op: bool = False) -> Any:
    """Replace each tensor (2+ dims) by the rank-r PowerSGD approximation of its sum or average
    over ranks; returns the list. Keys "{key}/{i}" hold warm-start Q and error-feedback residuals.
    """
    check_choice("op", op, ["avg", "sum"])
    psgd, ef = _powersgd_parts(compressor)
    for t in tensors:
        check_input(psgd.name, t)
        matrix_shape(t.shape)
    return _run(comm, lambda: _powersgd_allreduce(comm, list(tensors), psgd, ef, op, key), async_op)


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    pieces = torch.split(flat, [s.numel() for s in shapes])
    return [p.view(s) for p, s in zip(pieces, shapes)]


def _corrected(ef: ErrorFeedback | None, t: torch.Tensor, key: str) -> tuple[torch.Tensor, bool]:
    """(t + residual in fp32, whether that sum lives in the residual's own buffer): an fp32 t adds onto
    its key's fp32 residual in place (the same bits as t + residual), no tensor allocated."""
    if ef is None:
        return t.detach().float(), False
    r = ef.residuals.get(key)
    if r is not None and r.shape == t.shape and t.dtype == r.dtype == torch.float32 and r.device == t.device \
            and r.is_contiguous() and t.is_contiguous():
        return r.add_(t.detach()), True
    return ef.corrected(t, key), False


def _powersgd_allreduce(comm: Communicator, tensors: list[torch.Tensor], psgd: PowerSGD,
                        ef: ErrorFeedback | None, op: str, key: str) -> list[torch.Tensor]:
    keys = [f"{key}/{i}" for i in range(len(tensors))]
    for t, k in zip(tensors, keys):  # shape errors before any residual is touched
        r = ef.residuals.get(k) if ef else None
        if r is not None and r.shape != t.shape:
            ef.corrected(t, k)
    corrected, in_place = zip(*[_corrected(ef, t, k) for t, k in zip(tensors, keys)]) if tensors else ((), ())
    ms = [c.reshape(matrix_shape(c.shape)) for c in corrected]
    qs = [psgd.start_q(k, m.shape[1], psgd.factor_rank(m.shape), m.device) for k, m in zip(keys, ms)]
    ps = [m @ q for m, q in zip(ms, qs)]
    flat_p = torch.cat([p.reshape(-1) for p in ps])
    comm.allreduce(flat_p, "sum", label="powersgd_allreduce.p")
    ps = [orthonormalize(p) for p in _split(flat_p, [p.shape for p in ps])]
    qs = [m.T @ p for m, p in zip(ms, ps)]
    flat_q = torch.cat([q.reshape(-1) for q in qs])
    comm.allreduce(flat_q, op, label="powersgd_allreduce.q")
    for t, k, c, own, p, q in zip(tensors, keys, corrected, in_place, ps, _split(flat_q, [q.shape for q in qs])):
        psgd.remember(k, q)
        with torch.no_grad():
            if (ef is None or own) and t.dtype == torch.float32 and t.is_contiguous():  # no N-size temporary
                torch.matmul(p, q.T, out=t.detach().view(p.shape[0], q.shape[0]))
                if own:
                    c.sub_(t.detach().view(c.shape))  # the residual, kept: corrected - approximation
                continue
            approx = (p @ q.T).view(t.shape)
            if ef:
                ef.keep(k, c, approx)
            t.copy_(approx)
    return list(tensors)


# -- expected bytes ------------------------------------------------------------------------
def _allreduce_bytes(nbytes: int, elem_bytes: int, world: int, rank: int, backend: str) -> int:
    if backend == "gloo":
        return wire.gloo_allreduce(nbytes, elem_bytes, world, rank).bytes_sent
    return wire.ring_allreduce(nbytes, world).bytes_sent


def expected_bytes_sent(collective: str, shape: ShapeLike | Sequence[ShapeLike], dtype: torch.dtype, world: int,
                        rank: int = 0, compressor: Compressor | None = None, backend: str = "gloo",
                        payload_nbytes: int | None = None) -> int:
    """Payload bytes `rank` sends in one call, from the formulas the Communicator counts with.

    allreduce (plain): the backend's ring, 2(W-1)/W * N * b. quantized_allreduce: the other ranks'
    chunk payloads, then (W-1) copies of its own, 2(W-1)/W * N * c. compressed_allgather:
    (W-1) * C, plus (W-1) * 8 for sizes when payloads vary (then C = `payload_nbytes`).
    powersgd_allreduce (`shape` = list of shapes): allreduce of the fp32 P factors, then of the Q's.
    """
    check_choice("collective", collective, ["allreduce", "compressed_allgather", "powersgd_allreduce",
                                            "quantized_allreduce"])
    if collective == "powersgd_allreduce":
        psgd, _ = _powersgd_parts(compressor)
        ranks = [psgd.factor_rank(s) for s in shape]
        p_bytes = sum(4 * matrix_shape(s)[0] * r for s, r in zip(shape, ranks))
        q_bytes = sum(4 * matrix_shape(s)[1] * r for s, r in zip(shape, ranks))
        return sum(_allreduce_bytes(n, 4, world, rank, backend) for n in (p_bytes, q_bytes))
    numel = as_shape(shape).numel()
    if collective == "allreduce":
        return _allreduce_bytes(numel * dtype.itemsize, dtype.itemsize, world, rank, backend)
    if compressor is None:
        raise ValueError(f"expected_bytes_sent: collective={collective!r} needs a compressor")
    if collective == "quantized_allreduce":
        _check_chunkable(compressor)
        chunks = [compressor.payload_bytes((b - a,), dtype) for a, b in chunk_ranges(numel, world, compressor.align)]
        return sum(n for j, n in enumerate(chunks) if j != rank) + (world - 1) * chunks[rank]
    if compressor.fixed_size:
        return (world - 1) * compressor.payload_bytes(shape, dtype)
    if payload_nbytes is None:
        raise ValueError(f"expected_bytes_sent: {compressor!r} payloads vary in size; pass payload_nbytes")
    return (world - 1) * (SIZE_BYTES + payload_nbytes)
