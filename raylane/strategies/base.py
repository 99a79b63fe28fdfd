"""The strategy contract and registry.

A strategy has two halves.

- `WorkerStrategy` runs inside each TrainWorker. It gets a `WorkerContext` (model,
  optimizer, Communicator, a loss function) and turns one step into local compute plus
  collectives: `train_step(batch, lr) -> metrics`. Driver-decided strategies add their
  own methods, which the driver half calls through `WorkerCalls.call(...)`.
- `DriverStrategy` runs in the Coordinator and says what one round asks of which workers
  (`run_round`). For peer-to-peer strategies it is "everyone: step".

Both halves have `state_dict()` / `load_state_dict()`; what they hold goes into
checkpoints. A strategy registers itself by name with `register(...)`; a duplicate
name raises. The coordinator looks strategies up by the name the config gives.

Call order on a worker: `__init__` → (`load_state_dict`) → `train_step`* ; after the
process group is re-formed, `set_comm(new_comm)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Protocol

import torch

from raylane.comm import Communicator
from raylane.validation import ConfigError


@dataclass
class WorkerContext:
    """What a worker half may use. `loss(batch)` runs the forward pass and returns the loss."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    comm: Communicator
    loss: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    grad_clip: float
    rank: int
    world_size: int
    seed: int


class WorkerStrategy:
    """Worker half. Subclasses implement `train_step`."""

    # True when every replica holds the same parameters and state after each step (ddp):
    # checkpoints then keep one copy, and a new worker can copy any live peer.
    replicas_identical: ClassVar[bool] = True
    # The worker methods whose success means this worker applied the step's update.
    update_methods: ClassVar[tuple[str, ...]] = ("train_step",)

    def __init__(self, cfg: Any, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], lr: float) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__}.train_step")

    # Parameter views evaluation reports: the first is `eval/loss`, others `eval/loss_<view>`
    # (DiLoCo: "global" outer parameters, then "replica_avg").
    eval_views: ClassVar[tuple[str, ...]] = ("model",)

    @contextlib.contextmanager
    def eval_parameters(self, view: str = "model") -> Iterator[None]:
        """Put the parameters of evaluation view `view` in the model for the duration (default:
        the model's own). May use collectives: every rank evaluates every view."""
        yield

    def set_comm(self, comm: Communicator) -> None:
        self.ctx.comm = comm

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # This rank's own state, which differs between replicas even when their parameters do not
    # (lgreco's error-feedback residuals): checkpointed per rank beside the RNG streams, and kept
    # by a surviving worker when a live peer's replica state is copied to it; a replacement starts
    # from `{}`. Loaded after `load_state_dict`.
    def local_state_dict(self) -> dict[str, Any]:
        return {}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        pass


class WorkerCalls(Protocol):
    """What the driver half may ask of the workers (implemented by the WorkerGroup)."""

    world_size: int

    def call(self, method: str, *args: Any, ranks: list[int] | None = None, **kwargs: Any) -> list: ...
    def get(self, refs: list) -> list: ...


class DriverStrategy:
    """Driver half. The default runs peer-to-peer: every worker does `train_step` once per round."""

    def __init__(self, cfg: Any, world_size: int):
        self.cfg, self.world_size = cfg, world_size

    def run_round(self, workers: WorkerCalls, step: int, sample_offset: int, lr: float) -> list[dict]:
        """Run global step `step` (1-based) whose batch starts at `sample_offset`; per-worker metrics."""
        return workers.get(workers.call("train_step", sample_offset, lr))

    def finish(self, workers: WorkerCalls) -> None:
        """After the last round, before the final evaluation and checkpoint (e.g. apply work
        still in flight)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class StrategySpec:
    name: str
    config_cls: type
    worker_cls: type[WorkerStrategy]
    driver_cls: type[DriverStrategy]


_REGISTRY: dict[str, StrategySpec] = {}


def register(name: str, config_cls: type, worker_cls: type[WorkerStrategy],
             driver_cls: type[DriverStrategy] = DriverStrategy) -> None:
    if name in _REGISTRY:
        raise KeyError(f"strategy {name!r} is registered twice")
    _REGISTRY[name] = StrategySpec(name, config_cls, worker_cls, driver_cls)


def get(name: str) -> StrategySpec:
    if name not in _REGISTRY:
        raise ConfigError(f"strategy.name={name!r}: unknown strategy; choose one of {names()}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)
