"""DeepSpeed's own collectives, counted as they are issued, in the replica's `inner` Communicator.

DeepSpeed calls torch.distributed through its `TorchBackend`; `count_into(stats)` wraps that class's
collectives once per process so that every call adds its bytes to `stats` (the inner Communicator's
CommStats, as op `deepspeed/<op>`), hence to the worker's step bytes, `comm/inner/bytes_sent` and the
summary's bytes on the wire. Bytes are raylane.comm.wire's per-rank payloads of what the backend's
algorithm sends (Gloo, measured on this torch: reduce_scatter_tensor all-reduces the whole input;
reduce is a ring reduce-scatter then a gather of the chunks to the root). Calls inside a counted call
(a backend op delegating to another) are not counted twice. No comms logger is needed for it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist

from raylane.comm import wire

_state = threading.local()
_sink: list[Any] = [None]  # the CommStats the current engine counts into


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group(args: dict) -> tuple[int, int, bool]:
    group = args.get("group")
    gloo = dist.get_backend(group) == "gloo"
    return dist.get_world_size(group), dist.get_rank(group), gloo


def _allreduce(nbytes: int, esize: int, w: int, r: int, gloo: bool) -> wire.Traffic:
    return wire.gloo_allreduce(nbytes, esize, w, r) if gloo else wire.ring_allreduce(nbytes, w)


def _local(args: dict, key: str) -> int:
    group, rank = args.get("group"), args[key]
    return dist.get_group_rank(group, rank) if group is not None else rank


def _traffic(op: str, a: dict) -> wire.Traffic:
    w, r, gloo = _group(a)
    if w == 1:
        return wire.Traffic(0, 0)
    if op in ("all_reduce", "inference_all_reduce"):
        return _allreduce(_nbytes(a["tensor"]), a["tensor"].element_size(), w, r, gloo)
    if op == "all_reduce_coalesced":
        ts = a["tensors"]
        return _allreduce(sum(map(_nbytes, ts)), ts[0].element_size(), w, r, gloo)
    if op == "reduce_scatter_tensor":
        t = a["input_tensor"]
        return _allreduce(_nbytes(t), t.element_size(), w, r, gloo) if gloo else \
            wire.Traffic(*(2 * [(w - 1) * _nbytes(t) // w]))
    if op == "reduce_scatter":
        n = sum(map(_nbytes, a["input_list"]))
        return _allreduce(n, a["input_list"][0].element_size(), w, r, gloo) if gloo else \
            wire.Traffic(*(2 * [(w - 1) * n // w]))
    if op == "reduce":
        n = _nbytes(a["tensor"])
        gather = n // w if _local(a, "dst") != r else 0
        return wire.Traffic((w - 1) * n // w + gather, (w - 1) * n // w)
    if op == "broadcast":
        n, src = _nbytes(a["tensor"]), _local(a, "src")
        return wire.gloo_broadcast(n, w, r, src) if gloo else wire.chain_broadcast(n, w, r, src)
    if op == "all_gather":
        return wire.allgather(_nbytes(a["tensor"]), w)
    if op in ("all_gather_into_tensor", "all_gather_base"):
        return wire.allgather(_nbytes(a["input_tensor"]), w)
    if op == "all_gather_coalesced":
        return wire.allgather(sum(map(_nbytes, a["input_tensors"])), w)
    if op == "all_to_all_single":
        n = _nbytes(a["input"])
        return wire.Traffic((w - 1) * n // w, (w - 1) * n // w)
    raise AssertionError(f"no byte model for DeepSpeed op {op}")


# TorchBackend's parameters, in order (its methods are wrapped by decorators that hide their signatures)
PARAMS = {"all_reduce": ("tensor", "op", "group"), "inference_all_reduce": ("tensor", "op", "group"),
          "all_reduce_coalesced": ("tensors", "op", "group"), "reduce": ("tensor", "dst", "op", "group"),
          "reduce_scatter": ("output", "input_list", "op", "group"), "broadcast": ("tensor", "src", "group"),
          "all_gather": ("tensor_list", "tensor", "group"),
          "all_gather_into_tensor": ("output_tensor", "input_tensor", "group"),
          "all_gather_base": ("output_tensor", "input_tensor", "group"),
          "all_gather_coalesced": ("output_tensors", "input_tensors", "group"),
          "reduce_scatter_tensor": ("output_tensor", "input_tensor", "op", "group"),
          "all_to_all_single": ("output", "input")}


def _counted(op: str, fn: Callable) -> Callable:
    names = PARAMS[op]

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_state, "depth", 0)
        if depth == 0 and _sink[0] is not None:
            bound = {"group": None, **dict(zip(names, args)), **kwargs}
            _sink[0].add(f"deepspeed/{op}", _traffic(op, bound))
        _state.depth = depth + 1
        try:
            return fn(self, *args, **kwargs)
        finally:
            _state.depth = depth
    wrapper.__raylane_counted__ = True
    return wrapper


def count_into(stats: Any) -> None:
    """From now on DeepSpeed's collectives in this process add their bytes to `stats` (a CommStats)."""
    from deepspeed.comm.torch import TorchBackend

    for op in PARAMS:
        fn = getattr(TorchBackend, op, None)
        if fn is not None and not getattr(fn, "__raylane_counted__", False):
            setattr(TorchBackend, op, _counted(op, fn))
    _sink[0] = stats


def deepspeed_bytes(stats: Any) -> int:
    """Bytes sent so far by DeepSpeed's own collectives, as counted in `stats`."""
    return sum(s.bytes_sent for op, s in stats.ops.items() if op.startswith("deepspeed/"))
