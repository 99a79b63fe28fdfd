"""TrainWorker: one process of a run (a Ray actor; also usable as a plain object).

Holds the model, optimizer, dataset and the strategy's worker half. Call order:
`__init__` → `connect(...)` (joins a process-group generation; again after recovery)
→ (`load_state_dict`) → `train_step`* / `evaluate` / `state_dict`.
It never decides anything across workers: the coordinator and the strategy do.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from raylane.comm import Link, connect
from raylane.strategies import get as get_strategy
from raylane.workers import chaos
from raylane.strategies.base import StoreAddress, WorkerContext
from raylane.workers.data import GlobalSampler, build_dataset
from raylane.workers.models import build_model, loss_fn
from raylane.workers.optim import build_optimizer


class TrainWorker:
    def __init__(self, cfg: Any, rank: int, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.cfg, self.rank = cfg, rank
        self.device = torch.device("cuda", 0) if cfg.cluster.gpus_per_worker > 0 else torch.device("cpu")
        self.data = build_dataset(cfg.data, cfg.seed)
        self.sampler = GlobalSampler(self.data.num_train, cfg.seed)
        self.spec = get_strategy(cfg.strategy.name)
        # a replacement starts at the rank it replaces, in a world of cluster.num_workers
        self.part = self.spec.worker_cls.layout(cfg.strategy, cfg.cluster.num_workers).parts[rank]
        # a strategy that partitions the model as it is built (ZeRO-3) builds it in connect, in its group
        self._in_group = getattr(self.spec.worker_cls, "builds_model_in_group", lambda c: False)(cfg.strategy)
        self.model = None if self._in_group else self._build_model()
        self.optimizer = None if self._in_group else build_optimizer(self.model.parameters(), cfg.optim)
        self.strategy = None
        self.comm = None
        self.comms: dict[str, Any] = {}  # the named groups of the strategy's layout
        self._group_counted: dict[str, int] = {}  # per named group: bytes sent already reported
        self.step = 0  # the last step whose update this worker applied
        self._counted = (0, 0)  # (sent, recv) already reported in step metrics or spent on evaluation
        self._offset = 0  # the current step's first global sample (train_step sets it)
        torch.manual_seed(cfg.seed * 1000 + rank)  # dropout and other per-rank randomness

    def reinit(self, cfg: Any, rank: int, threads: int = 1) -> dict[str, Any]:
        """Serve a new run in this warm process: the last run's groups are dropped and everything is built
        anew, as a fresh worker builds it (the same seeds, hence the same bits). Returns `address()`."""
        self._abort_comms()
        self.__init__(cfg, rank, threads)
        return self.address()

    def park(self) -> str | None:
        """The run is over: drop its groups, model and data. Which later runs this process may serve:
        "plain" ones; after DeepSpeed (it keeps a default process group and module-level state of its own,
        which its next join replaces: strategies/replicas/deepspeed.py) only "deepspeed" ones; None: none."""
        self._abort_comms()
        self.comm, self.comms, self.strategy, self.model, self.optimizer, self.data = None, {}, None, None, None, None
        import gc

        gc.collect()
        if "deepspeed" in sys.modules:
            return "deepspeed"
        return None if torch.distributed.is_initialized() else "plain"

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        return build_model(cfg.model, self.data.vocab_size, self.data.input_dim, cfg.data.seq_len, cfg.seed,
                           part=self.part).to(self.device)

    # -- group membership -------------------------------------------------------------
    def address(self) -> dict[str, Any]:
        import ray

        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def connect(self, store_host: str, store_port: int, generation: int, rank: int, world_size: int,
                backend: str, timeout_s: float, link: Link | None = None, bind_host: str | None = None) -> int:
        """Join group generation `generation` as `rank`, and the named groups the strategy's layout
        puts this rank in; returns the rank."""
        self._abort_comms()
        self.rank, self._counted, self._group_counted = rank, (0, 0), {}
        self.comm = connect(store_host, store_port, generation, rank, world_size, backend, timeout_s, link,
                            bind_host)
        self.comms = {}
        layout = self.spec.worker_cls.layout(self.cfg.strategy, world_size)
        for name in layout.groups:
            found = layout.group_of(name, rank)
            if found is not None:
                index, ranks = found
                self.comms[name] = connect(store_host, store_port, generation, ranks.index(rank), len(ranks),
                                           backend, timeout_s, link, bind_host, name=f"{name}/{index}")
        store = StoreAddress(store_host, store_port, generation, backend, timeout_s, bind_host)
        if self.model is None:
            self.model = self.spec.worker_cls.build_model_in_group(self.cfg.strategy, self._build_model, store, rank)
            self.optimizer = build_optimizer(self.model.parameters(), self.cfg.optim)
        if self.strategy is None:
            ctx = WorkerContext(self.model, self.optimizer, self.comm, self._loss, self.cfg.optim.grad_clip,
                                rank, world_size, self.cfg.seed, comms=self.comms, part=self.part,
                                data=self.data, batch=self.batch, samples=self.samples,
                                batch_size=self.cfg.data.batch_size, store=store)
            self.strategy = self.spec.worker_cls(self.cfg.strategy, ctx)
        else:
            ctx = self.strategy.ctx
            ctx.rank, ctx.world_size, ctx.comms, ctx.store = rank, world_size, self.comms, store
            self.strategy.set_comm(self.comm)
        return rank

    def _abort_comms(self) -> None:
        for comm in [self.comm, *self.comms.values()]:
            if comm is not None and comm.pg is not None:
                comm.abort()

    def run(self, directive: chaos.Directive | None, step: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Apply this step's fault directive (if any), then run `method` (ours or the strategy's).

        When `method` is one of the strategy's update methods, success means step `step` is applied.
        """
        t0 = time.perf_counter()
        if directive:
            chaos.apply(directive, [self.comm, *self.comms.values()], self.cfg.seed * 7919 + step,
                        self.gradients_of)
        try:
            target = self if hasattr(type(self), method) else self.strategy
            result = getattr(target, method)(*args, **kwargs)
        except Exception:
            self._abort_comms()  # our peers blocked on us fail now, not at their collective timeout
            raise
        finally:
            chaos.clear([self.comm, *self.comms.values()])
        if method in self.strategy.update_methods:
            self.step = step
        if isinstance(result, dict) and "step_time_s" in result:
            result["step_time_s"] = time.perf_counter() - t0  # an injected delay is part of the step
        return result

    def set_step(self, step: int) -> None:
        self.step = step

    # -- compute ----------------------------------------------------------------------
    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        return loss_fn(self.model(x), y)

    def batch(self, sample_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch that starts at `sample_offset`."""
        bs = self.cfg.data.batch_size
        return self.data.train_batch(self.sampler.indices(sample_offset + self.rank * bs, bs))

    def samples(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global samples [start, start + count) of the training data."""
        return self.data.train_batch(self.sampler.indices(start, count))

    def train_step(self, sample_offset: int, lr: float) -> dict[str, float]:
        t0 = time.perf_counter()
        self._offset = sample_offset
        wait_before = self._wait_s()
        self.model.train()
        batch = self.strategy.make_batch(sample_offset)
        metrics = self.strategy.train_step(batch, lr)
        sent, recv = self._bytes_since_last_report()
        if "samples" not in metrics:
            metrics.update(samples=len(batch[1]), tokens=batch[1].numel())
        metrics.update(rank=self.rank, step_time_s=time.perf_counter() - t0,
                       comm_wait_s=self._wait_s() - wait_before, bytes_sent=sent, bytes_recv=recv,
                       group_bytes_sent=self._group_bytes())
        return metrics

    def gradients_of(self, ranks: list[int], flip_labels: bool = False) -> torch.Tensor:
        """(len(ranks), d): the flat gradients (parameters with requires_grad, in order) that those
        ranks' slices of this step's batch give on the current parameters, .grad untouched. The
        fault harness's omniscient adversary uses it (workers/chaos.py)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        bs, rows = self.cfg.data.batch_size, []
        for r in ranks:
            x, y = self.data.train_batch(self.sampler.indices(self._offset + r * bs, bs))
            if flip_labels:
                y = self.data.vocab_size - 1 - y
            grads = torch.autograd.grad(self._loss((x, y)), params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).detach().cpu()
                                   for g, p in zip(grads, params)]))
        return torch.stack(rows)

    def _bytes_since_last_report(self) -> tuple[int, int]:
        """Training bytes since the last step's report: also what async collectives issued
        between steps, never what evaluation spent."""
        totals = [c.stats.total() for c in [self.comm, *self.comms.values()]]
        sent_all, recv_all = sum(t.bytes_sent for t in totals), sum(t.bytes_recv for t in totals)
        sent, recv = sent_all - self._counted[0], recv_all - self._counted[1]
        self._counted = (sent_all, recv_all)
        return sent, recv

    def _wait_s(self) -> float:
        """Seconds spent waiting on collectives so far, in every group of this generation."""
        return sum(c.stats.wait_s for c in [self.comm, *self.comms.values()])

    def _group_bytes(self) -> dict[str, int]:
        """Training bytes sent per named group since the last step's report."""
        out = {}
        for name, comm in self.comms.items():
            total = comm.stats.total().bytes_sent
            out[name], self._group_counted[name] = total - self._group_counted.get(name, 0), total
        return out

    def _skip_group_bytes(self, before: dict[str, int]) -> None:
        """Bytes the named groups sent since `before` (evaluation's) are not training traffic."""
        for name, comm in self.comms.items():
            spent = comm.stats.total().bytes_sent - before.get(name, 0)
            self._group_counted[name] = self._group_counted.get(name, 0) + spent

    @torch.no_grad()
    def evaluate(self, num_shards: int) -> dict[str, tuple[float, int]]:
        """Per evaluation view: sum of eval losses and batch count over this rank's share; for a
        classification dataset also `<view>/accuracy`: (correct predictions, samples)."""
        self.model.eval()
        pending = self._bytes_since_last_report()  # training bytes, kept for the next step's report
        groups_before = {name: c.stats.total().bytes_sent for name, c in self.comms.items()}
        out = self._evaluate_views(num_shards)
        self._bytes_since_last_report()  # evaluation's own bytes are not training traffic
        self._counted = (self._counted[0] - pending[0], self._counted[1] - pending[1])
        self._skip_group_bytes(groups_before)
        return out

    def _evaluate_views(self, num_shards: int) -> dict[str, tuple[float, int]]:
        out = self.strategy.evaluate(num_shards)
        if out is not None:
            return out
        out = {}
        classification = getattr(self.data, "classification", False)
        for view in self.strategy.eval_views:
            total, count, correct, samples = 0.0, 0, 0, 0
            with self.strategy.eval_parameters(view):
                for i in range(self.rank, self.cfg.data.eval_batches, num_shards):
                    x, y = (t.to(self.device) for t in self.data.eval_batch(i, self.cfg.data.batch_size))
                    logits = self.model(x)
                    total += loss_fn(logits, y).item()
                    count += 1
                    correct += int((logits.argmax(-1) == y).sum())
                    samples += y.numel()
            out[view] = (total, count)
            if classification:
                out[f"{view}/accuracy"] = (correct, samples)
        return out

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a strategy-specific worker method (driver-decided strategies)."""
        return getattr(self.strategy, method)(*args, **kwargs)

    # -- state ------------------------------------------------------------------------
    def state_dict(self, replica: bool = True) -> dict[str, Any]:
        """`replica`: model, optimizer and strategy state (skipped when a peer's copy will do);
        `local`: what is this process's own (RNG streams). Tensors and plain types only, so that a
        checkpoint loads with `torch.load(weights_only=True)`."""
        local = {**rng_state(), "strategy": self.strategy.local_state_dict()}
        if not replica:
            return {"replica": None, "local": local}
        return {"replica": compact({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                    "strategy": self.strategy.state_dict()}),
                "local": local}

    def load_state_dict(self, replica: dict[str, Any], local: dict[str, Any] | None = None) -> None:
        self.model.load_state_dict(replica["model"])
        self.optimizer.load_state_dict(replica["optimizer"])
        self.strategy.load_state_dict(replica["strategy"])
        if local is not None:
            set_rng_state(local)
            self.strategy.load_local_state_dict(local.get("strategy", {}))

    def flat_parameters(self) -> torch.Tensor:
        """The first evaluation view's parameters, flat (whole also where the strategy partitions them)."""
        return self.strategy.full_parameters()

    @torch.no_grad()
    def fingerprint(self, per_param: int = 8) -> list[float]:
        """`per_param` values at evenly spaced positions of each local parameter (the same positions
        on every rank; orchestrator/contract.py compares them across ranks that share a state key)."""
        out: list[float] = []
        for p in self.model.parameters():
            flat = p.detach().reshape(-1)
            if flat.numel():
                idx = torch.linspace(0, flat.numel() - 1, min(per_param, flat.numel())).long().to(flat.device)
                out += flat[idx].double().cpu().tolist()
        return out

    def comm_stats(self) -> dict[str, Any]:
        return self.comm.stats.as_dict()

    def ping(self) -> tuple[int, int]:
        """(rank, last applied step): a heartbeat."""
        return self.rank, self.step


def compact(tree: Any) -> Any:
    """`tree` with every tensor holding only its own bytes: a view into a larger buffer (engine=torch's and
    ZeRO-0's flat parameters, DeepSpeed's flat groups) is cloned, or saving or sending it ships the whole
    buffer once per view."""
    if isinstance(tree, torch.Tensor):
        own = tree.numel() * tree.element_size()
        return tree.clone() if tree.untyped_storage().nbytes() > own else tree
    if isinstance(tree, dict):
        return {k: compact(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(compact(v) for v in tree)
    return tree


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy and Python RNG streams as tensors and plain types."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(local: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(local["torch"])
    n = local["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = local["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss_next"]))
