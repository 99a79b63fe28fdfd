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

Call order on a worker: `__init__` → (`load_state_dict`) → (`make_batch` → `train_step`)* ;
after the process groups are re-formed, `set_comm(new_comm)` (with `ctx.comms` already replaced).

What a rank holds is the strategy's `layout(cfg, world_size)`: the key of its state (ranks with
equal keys hold identical state: checkpoints keep one copy per key, recovery copies from a live
rank with the same key), the model part it builds, and the named groups it joins. The
coordinator reads the layout; it never asks which strategy runs.
"""

from __future__ import annotations

import importlib

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Protocol

import torch

from raylane.comm import Communicator
from raylane.validation import ConfigError


@dataclass(frozen=True)
class Layout:
    """What each rank of a world of `len(state_keys)` ranks holds and joins.

    `state_keys[r]`: the key of rank r's state (equal keys = identical state). `parts[r]`: the
    model part rank r builds (None: the whole model; plain data). `groups`: name -> disjoint
    tuples of ranks; a rank joins the tuple that holds it as the named Communicator `ctx.comms[name]`.
    `elastic=False`: the world may not shrink after a fault (a lost rank must be replaced).
    `unit`: the world shrinks and grows only by whole units of `unit` consecutive ranks (a
    multi-rank replica: a unit with a lost rank is dropped whole); the world is whole units.
    `seeds[r]` (optional): the class of rank r's state key: after a fault, a key that no clean live
    rank holds may be seeded from a clean live holder of another key of the same class (a lost
    replica restarts from a copy of a live peer replica; strategies whose replicas differ opt in).
    """

    state_keys: tuple[str, ...]
    parts: tuple[Any, ...]
    groups: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    elastic: bool = True
    unit: int = 1
    seeds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.state_keys)
        assert len(self.parts) == n, (len(self.parts), n)
        assert self.seeds is None or len(self.seeds) == n, (self.seeds, n)
        assert self.unit >= 1 and n % self.unit == 0, (n, self.unit)
        for name, tuples in self.groups.items():
            members = [r for t in tuples for r in t]
            assert len(members) == len(set(members)) and all(0 <= r < n for r in members), (name, tuples)

    def group_of(self, name: str, rank: int) -> tuple[int, tuple[int, ...]] | None:
        """(index, ranks) of the tuple of group `name` that holds `rank`; None if none does."""
        for i, ranks in enumerate(self.groups.get(name, ())):
            if rank in ranks:
                return i, ranks
        return None

    def holders(self) -> dict[str, list[int]]:
        """state key -> the ranks that hold it, in rank order."""
        out: dict[str, list[int]] = {}
        for r, key in enumerate(self.state_keys):
            out.setdefault(key, []).append(r)
        return out


@dataclass(frozen=True)
class StoreAddress:
    """Where the run's store is, for a strategy that forms a torch.distributed group of its own
    (e.g. DeepSpeed needs the default group): use the prefix `gen<generation>/<name>`."""

    host: str
    port: int
    generation: int
    backend: str
    timeout_s: float
    bind_host: str | None = None


@dataclass
class WorkerContext:
    """What a worker half may use. `loss(batch)` runs the forward pass and returns the loss.

    `comms`: this rank's named groups (`Layout.groups`), each with its own rank and size.
    `part`: the model part this rank built. `data`: the worker's dataset. `batch(offset)`: the
    worker's own slice of the global batch that starts at `offset`.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    comm: Communicator
    loss: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    grad_clip: float
    rank: int
    world_size: int
    seed: int
    comms: dict[str, Communicator] = field(default_factory=dict)
    part: Any = None
    data: Any = None
    batch: Callable[[int], Any] | None = None
    samples: Callable[[int, int], Any] | None = None  # samples(start, count): global samples [start, start + count)
    batch_size: int = 0  # samples per rank per step (data.batch_size)
    store: StoreAddress | None = None


class WorkerStrategy:
    """Worker half. Subclasses implement `train_step`."""

    # True when every replica holds the same parameters and state after each step (ddp):
    # checkpoints then keep one copy, and a new worker can copy any live peer.
    replicas_identical: ClassVar[bool] = True
    # True when a step that failed on a rank leaves that rank's state as of its last applied step
    # (the update is applied only after every collective returned): recovery may then copy state
    # from live peers. False (DiLoCo's inner steps are local): recovery restores a checkpoint.
    failed_step_keeps_state: ClassVar[bool] = True
    # The worker methods whose success means this worker applied the step's update.
    update_methods: ClassVar[tuple[str, ...]] = ("train_step",)

    def __init__(self, cfg: Any, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx

    @classmethod
    def layout(cls, cfg: Any, world_size: int) -> Layout:
        """What each rank holds (default: one replica key, or one per rank when replicas differ;
        the whole model everywhere; no named groups)."""
        keys = ("replica",) * world_size if cls.replicas_identical else \
            tuple(f"replica_{r}" for r in range(world_size))
        return Layout(keys, (None,) * world_size)

    def make_batch(self, sample_offset: int) -> Any:
        """What `train_step` gets for the step whose global batch starts at `sample_offset`."""
        return self.ctx.batch(sample_offset)

    def evaluate(self, num_shards: int) -> dict[str, tuple[float, int]] | None:
        """None: the worker evaluates with its own loop over eval batches. A strategy that evaluates
        otherwise (through a pipeline) returns the worker's shape: {view: (loss sum, count),
        f"{view}/accuracy": (correct, samples)} for each eval view; every rank is called."""
        return None

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

    @torch.no_grad()
    def full_parameters(self) -> torch.Tensor:
        """The first evaluation view's parameters as one flat CPU vector (`TrainWorker.flat_parameters`).
        A strategy whose parameters are partitioned gathers them here (a collective: every rank calls it)."""
        with self.eval_parameters(self.eval_views[0]):
            return torch.cat([p.detach().reshape(-1).cpu() for p in self.ctx.model.parameters()])

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

# The built-in strategies, by the module that registers each: imported on first use, so a worker
# loads only its own strategy's family (and a driver that never names gnnpipe never imports it).
BUILTIN: dict[str, str] = {
    "ddp": "raylane.strategies.ddp",
    "diloco": "raylane.strategies.diloco.strategy",
    "gradient_coding": "raylane.strategies.gradient_coding.strategy",
    "robust": "raylane.strategies.robust.strategy",
    "lgreco": "raylane.strategies.lgreco.strategy",
    "gnnpipe": "raylane.strategies.gnn.gnnpipe",
    "graph_parallel": "raylane.strategies.gnn.graph_parallel",
    "hsdp": "raylane.strategies.replicas.hsdp",
    "replica_diloco": "raylane.strategies.replicas.diloco",
}


def register(name: str, config_cls: type, worker_cls: type[WorkerStrategy],
             driver_cls: type[DriverStrategy] = DriverStrategy) -> None:
    if name in _REGISTRY:
        raise KeyError(f"strategy {name!r} is registered twice")
    _REGISTRY[name] = StrategySpec(name, config_cls, worker_cls, driver_cls)


def get(name: str) -> StrategySpec:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ConfigError(f"strategy.name={name!r}: unknown strategy; choose one of {names()}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(set(_REGISTRY) | set(BUILTIN))
