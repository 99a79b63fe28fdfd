"""What a worker does when the fault plan says so: the worker side of the failure harness.

The coordinator turns the plan into one `Directive` per rank per step; the TrainWorker
applies it (`apply`) before the step's first call and clears the one-step hooks after.
- `delay_s`: a straggler: sleep before computing.
- `crash`: "exit" ends the process at once (os._exit); "collective" ends it inside the
  step's first collective.
- `hang_s`: stop responding inside the step's first collective for that long.
- `byzantine`: replace every tensor this worker sends during the step
  (sign_flip | scale | gaussian | zeros | nan | inf; `byzantine_scale` is the factor or std).
  The gradient-level modes (alie | ipm | mimic | label_flip, and the adaptive alie_opt | ipm_opt
  that search their factor against the strategy's own aggregator: GRADIENT_MODES) do not touch the
  wire: `comm.byzantine` gets a `ByzantineStep`, and a strategy that exchanges gradients
  (robust) asks it to `forge` the row this worker sends. The colluding, omniscient adversary
  computes the honest workers' gradients of the step itself, with the worker's `oracle`
  (same model, their slices of the global batch: nothing extra crosses the network), then
  applies raylane.strategies.attacks. label_flip computes its own gradient on flipped labels.
- `colluders`: every rank that is Byzantine at this step. Every rank gets it (a ByzantineStep
  with mode None on the honest ones): the ground truth for metrics (distance to the honest
  mean), and the Byzantine ranks' knowledge of each other.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from raylane.strategies import attacks

WIRE_MODES = ("sign_flip", "scale", "gaussian", "zeros", "nan", "inf")
GRADIENT_MODES = ("alie", "ipm", "mimic", "label_flip", "alie_opt", "ipm_opt")
ADAPTIVE = {"alie_opt": attacks.alie_opt, "ipm_opt": attacks.ipm_opt}
BYZANTINE_MODES = WIRE_MODES + GRADIENT_MODES

# oracle(ranks, flip_labels) -> (len(ranks), d): those ranks' flat gradients of the current step
Oracle = Callable[[list[int], bool], torch.Tensor]


@dataclass
class Directive:
    delay_s: float = 0.0
    crash: str | None = None        # exit | collective
    hang_s: float = 0.0
    byzantine: str | None = None
    byzantine_scale: float = 10.0
    epsilon: float = 0.1            # ipm
    z: float | None = None          # alie (None: from n and f, as the paper defines)
    target: int = -1                # mimic: honest row to copy (-1: the paper's choice)
    colluders: tuple[int, ...] = ()  # every rank Byzantine at this step (given to every rank)

    def __bool__(self) -> bool:
        return bool(self.delay_s or self.crash or self.hang_s or self.byzantine or self.colluders)


@dataclass
class ByzantineStep:
    """This step's Byzantine ground truth on one rank; `mode` is None on an honest rank."""

    ranks: tuple[int, ...]
    mode: str | None = None
    epsilon: float = 0.1
    z: float | None = None
    target: int = -1
    oracle: Oracle | None = None

    def forge(self, own: torch.Tensor, rank: int, world_size: int,
              target: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The flat gradient this rank sends: its own unless a gradient-level mode attacks. `target`:
        the strategy's aggregation of an (n, d) matrix, which the adaptive modes search against."""
        if self.mode not in GRADIENT_MODES:
            return own
        if self.oracle is None:
            raise RuntimeError(f"byzantine mode {self.mode!r} needs the worker's gradient oracle")
        if self.mode == "label_flip":
            return self.oracle([rank], True)[0].to(own.dtype)
        honest = self.oracle([r for r in range(world_size) if r not in self.ranks], False)
        if self.mode in ADAPTIVE:
            if target is None:
                raise RuntimeError(f"byzantine mode {self.mode!r} needs the strategy's aggregator to search against")
            return ADAPTIVE[self.mode](honest, self.ranks, world_size, target)[0].to(own.dtype)
        if self.mode == "alie":
            z = self.z if self.z is not None else attacks.alie_z(world_size, len(self.ranks))
            forged = attacks.alie(honest, z)
        elif self.mode == "ipm":
            forged = attacks.ipm(honest, self.epsilon)
        else:
            forged = attacks.mimic(honest, self.target)
        return forged.to(own.dtype)


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
        return torch.full_like(t, float("inf" if mode == "inf" else "nan"))
    return corrupt


def apply(directive: Directive, comms: list, seed: int, oracle: Oracle | None = None) -> None:
    """Apply `directive` to this process and its Communicators: the world group's and the named
    groups' (hooks last one step; a crash or hang fires at the first collective in any group)."""
    if directive.crash == "exit":
        os._exit(17)
    if directive.delay_s > 0:
        time.sleep(directive.delay_s)
    if directive.crash == "collective" or directive.hang_s > 0:
        def in_collective(op: str) -> None:
            if directive.crash:
                os._exit(17)
            for comm in comms:
                comm.before_op = None
            time.sleep(directive.hang_s)
        for comm in comms:
            comm.before_op = in_collective
    if directive.byzantine in WIRE_MODES:
        for i, comm in enumerate(comms):
            comm.outgoing = corruption(directive.byzantine, directive.byzantine_scale, seed + i)
    if directive.colluders:
        comms[0].byzantine = ByzantineStep(directive.colluders, directive.byzantine, directive.epsilon, directive.z,
                                           directive.target, oracle)


def clear(comms: list) -> None:
    for comm in comms:
        comm.before_op = None
        comm.outgoing = None
        comm.byzantine = None
