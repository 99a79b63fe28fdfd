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
  applies raylane.strategies.blocks.attacks. label_flip computes its own gradient on flipped labels.
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

from raylane.strategies.blocks import attacks

WIRE_MODES = ("sign_flip", "scale", "gaussian", "zeros", "nan", "inf")
GRADIENT_MODES = ("alie", "ipm", "mimic", "label_flip", "alie_opt", "ipm_opt")
ADAPTIVE = {"alie_opt": attacks.alie_opt, "ipm_opt": attacks.ipm_opt}
ROW_MODES = tuple(m for m in GRADIENT_MODES if m != "label_flip")  # forged from the honest rows alone
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
    # (rank, mode, epsilon, z, target) of every colluder whose mode forges a row from the honest ones
    # (given to every rank: where rows are gathered first, as in DiLoCo's robust outer sync, each rank
    # plays the rushing adversary's late row itself, from the same rows: the same bits everywhere)
    row_attacks: tuple[tuple, ...] = ()

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
    row_attacks: tuple[tuple, ...] = ()

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
        return self._forged(honest, list(self.ranks), world_size, target).to(own.dtype)

    def forge_rows(self, G: torch.Tensor, row_of: Callable[[int], int],
                   target: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """G (n, d) gathered rows with the rushing adversary's rows in place: every colluder of
        `row_attacks` (world rank -> its row: `row_of`) sends the row its mode forges from the honest
        rows (those of ranks not in `ranks`), having seen them first. Used where no oracle can
        recompute the honest rows (another replica's H inner steps). Wire modes are not here: they
        corrupted the colluder's payload on the wire already."""
        if not self.row_attacks:
            return G
        n = G.shape[0]
        bad = sorted({row_of(r) for r in self.ranks})
        honest = G[[i for i in range(n) if i not in bad]]
        out = G.clone()
        for rank, mode, epsilon, z, mimic_target in self.row_attacks:
            step = ByzantineStep(self.ranks, mode, epsilon, z, mimic_target)
            out[row_of(rank)] = step._forged(honest, bad, n, target).to(G.dtype)
        return out

    def _forged(self, honest: torch.Tensor, rows: list[int], n: int,
                target: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        if self.mode in ADAPTIVE:
            if target is None:
                raise RuntimeError(f"byzantine mode {self.mode!r} needs the strategy's aggregator to search against")
            return ADAPTIVE[self.mode](honest, rows, n, target)[0]
        if self.mode == "alie":
            z = self.z if self.z is not None else attacks.alie_z(n, len(rows))
            return attacks.alie(honest, z)
        if self.mode == "ipm":
            return attacks.ipm(honest, self.epsilon)
        return attacks.mimic(honest, self.target)


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
                                           directive.target, oracle, directive.row_attacks)


def clear(comms: list) -> None:
    for comm in comms:
        comm.before_op = None
        comm.outgoing = None
        comm.byzantine = None
