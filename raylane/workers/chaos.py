"""What a worker does when the fault plan says so: the worker side of the failure harness.

The coordinator turns the plan into one `Directive` per rank per step; the TrainWorker
applies it (`apply`) before the step's first call and clears the one-step hooks after.
- `delay_s`: a straggler: sleep before computing.
- `crash`: "exit" ends the process at once (os._exit); "collective" ends it inside the
  step's first collective.
- `hang_s`: stop responding inside the step's first collective for that long.
- `byzantine`: replace every tensor this worker sends during the step
  (sign_flip | scale | gaussian | zeros | nan; `byzantine_scale` is the factor or std).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

BYZANTINE_MODES = ("sign_flip", "scale", "gaussian", "zeros", "nan")


@dataclass
class Directive:
    delay_s: float = 0.0
    crash: str | None = None        # exit | collective
    hang_s: float = 0.0
    byzantine: str | None = None
    byzantine_scale: float = 10.0

    def __bool__(self) -> bool:
        return bool(self.delay_s or self.crash or self.hang_s or self.byzantine)


def corruption(mode: str, scale: float, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def corrupt(t: torch.Tensor) -> torch.Tensor:
        if mode == "sign_flip":
            return -t
        if mode == "scale":
            return t * scale
        if mode == "gaussian":
            return t + scale * torch.randn(t.shape, generator=gen).to(t.dtype)
        if mode == "zeros":
            return torch.zeros_like(t)
        return torch.full_like(t, float("nan"))
    return corrupt


def apply(directive: Directive, comm, seed: int) -> None:
    """Apply `directive` to this process and its Communicator (hooks last one step)."""
    if directive.crash == "exit":
        os._exit(17)
    if directive.delay_s > 0:
        time.sleep(directive.delay_s)
    if directive.crash == "collective" or directive.hang_s > 0:
        def in_collective(op: str) -> None:
            if directive.crash:
                os._exit(17)
            comm.before_op = None
            time.sleep(directive.hang_s)
        comm.before_op = in_collective
    if directive.byzantine:
        comm.outgoing = corruption(directive.byzantine, directive.byzantine_scale, seed)


def clear(comm) -> None:
    comm.before_op = None
    comm.outgoing = None
