"""diloco: equivalences (ddp, a single-process DiLoCo), the fragment schedule, bytes, state round trips.

Multi-process tests run the worker half on spawned Gloo ranks (tests/multiproc.py); the
Coordinator tests share the session Ray cluster. Every test is bounded by a timeout.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raylane.comm import expected_bytes_sent
from raylane.orchestrator.coordinator import Coordinator
from raylane.strategies.base import WorkerContext
from raylane.strategies.diloco.strategy import DiLoCoConfig, DiLoCoWorker
from raylane.validation import from_dict
from raylane.workers.data import GlobalSampler, build_dataset
from raylane.workers.models import ModelConfig, build_model, loss_fn
from raylane.workers.optim import OptimConfig, build_optimizer, lr_at
from tests.conftest import small_cfg, train_and_collect
from tests.multiproc import run_ranks

pytestmark = pytest.mark.timeout(240)

VOCAB, SEQ = 11, 8
PRESETS = Path(__file__).resolve().parent.parent / "configs" / "compression"


# -- the worker half on Gloo ranks (no Ray) ------------------------------------------------
def _strategy(comm, **strategy) -> DiLoCoWorker:
    model = build_model(ModelConfig(n_layer=4, d_model=16, n_head=2), VOCAB, 0, SEQ, seed=0)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-2))
    ctx = WorkerContext(model, opt, comm, lambda b: loss_fn(model(b[0]), b[1]), 1.0, comm.rank,
                        comm.world_size, 0)
    return DiLoCoWorker(from_dict(DiLoCoConfig, strategy, "strategy"), ctx)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(1000 * step + rank))
    return tokens[:, :-1], tokens[:, 1:]


def _flat(s: DiLoCoWorker) -> tuple[np.ndarray, np.ndarray]:
    """(local, global) parameters of a replica (numpy: they cross a process boundary)."""
    local = torch.cat([p.detach().reshape(-1) for p in s.ctx.model.parameters()]).numpy().copy()
    with s.eval_parameters("global"):
        glob = torch.cat([p.detach().reshape(-1) for p in s.ctx.model.parameters()]).numpy().copy()
    return local, glob


def _outer_bytes(comm) -> int:
    return sum(o.bytes_sent for k, o in comm.stats.ops.items() if k.startswith("quantized_allreduce"))


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Every two-rank scenario below, run in one pair of processes (spawning is the slow part)."""
    return run_ranks(_scenarios, 2, timeout_s=150)


def _scenarios(comm) -> dict:
    return {"schedules": _trace_schedules(comm), "round_trip": _round_trip(comm), "nan": _nan_sync(comm),
            "finish": _finish_in_flight(comm)}


def _trace_schedules(comm) -> dict:
    out = {}
    for fragments in (1, 2, 4):
        for tau in (0, 1, 5):
            s = _strategy(comm, sync_every=8, fragments=fragments, overlap_steps=tau, merge_alpha=0.5)
            steps = [s.train_step(_batch(comm.rank, t), 1e-2) for t in range(1, 33)]
            out[(fragments, tau)] = ([(m["diloco/fragment"], m["diloco/merged"], m["diloco/in_flight"])
                                      for m in steps], _flat(s)[1])
    return out


def test_every_fragment_syncs_exactly_once_per_h_steps_and_merges_tau_later(two_ranks):
    ranks = [r["schedules"] for r in two_ranks]
    for (fragments, tau), (trace, glob) in ranks[0].items():
        starts = [(t, f) for t, (f, _, _) in enumerate(trace, 1) if f >= 0]
        for p in range(fragments):
            first = p * 8 // fragments or 8
            assert [t for t, f in starts if f == p] == list(range(first, 33, 8)), (fragments, tau, p)
        for t, (_, merged, in_flight) in enumerate(trace, 1):
            assert merged == sum(1 for s, _ in starts if s + tau == t), (fragments, tau, t)
            assert in_flight == sum(1 for s, _ in starts if s <= t < s + tau), (fragments, tau, t)
        assert np.array_equal(glob, ranks[1][(fragments, tau)][1]), "global parameters differ across ranks"
    assert max(x[2] for x in ranks[0][(4, 5)][0]) == 3, "tau=5 > H/P=2 should keep 3 fragments in flight"


def _count_bytes(comm, presets: list[dict]) -> list:
    out = []
    for compression in presets:
        s = _strategy(comm, sync_every=2, fragments=2, compression=compression)
        for t in range(1, 5):
            before = _outer_bytes(comm)
            m = s.train_step(_batch(comm.rank, t), 1e-2)
            numel = s.outer.fragments[m["diloco/fragment"]].numel
            formula = expected_bytes_sent("quantized_allreduce", numel, torch.float32, comm.world_size, comm.rank,
                                          s.outer.compressor)
            out.append((compression, _outer_bytes(comm) - before, m["diloco/bytes_this_step"], formula))
    overlapped = _strategy(comm, sync_every=4, fragments=2, overlap_steps=3, compression=presets[-1])
    before = _outer_bytes(comm)
    metrics = [overlapped.train_step(_batch(comm.rank, t), 1e-2) for t in range(1, 7)]
    overlapped.state_dict()  # waits for the syncs in flight
    out.append(("overlapped", _outer_bytes(comm) - before, metrics[-1]["diloco/bytes_total"], None))
    return out


def test_counted_bytes_per_sync_equal_the_compressors_formula():
    presets = [yaml.safe_load((PRESETS / f"{n}.yaml").read_text())
               for n in ("none", "bf16", "int8", "int4", "fp4_e2m1", "fp4_e3m0")]
    presets.append({"name": "int", "bits": 8, "block_size": 64, "error_feedback": True})
    for rank in run_ranks(_count_bytes, 3, presets, timeout_s=150):
        for name, counted, metric, formula in rank:
            assert counted == metric > 0, name
            assert formula is None or counted == formula, name
    fp32, fp4 = rank[0][1], rank[5 * 4][1]
    assert 7 < fp32 / fp4 < 8, "fp4 should send about 1/8 of fp32"


def _round_trip(comm) -> tuple:
    cfg = dict(sync_every=4, fragments=2, overlap_steps=3, merge_alpha=0.5,
               compression={"name": "fp4", "format": "e3m0", "block_size": 32, "stochastic": True,
                            "error_feedback": True})
    straight = _strategy(comm, **cfg)
    for t in range(1, 13):
        straight.train_step(_batch(comm.rank, t), 1e-2)
    interrupted = _strategy(comm, **cfg)
    for t in range(1, 6):
        interrupted.train_step(_batch(comm.rank, t), 1e-2)
    saved = copy.deepcopy({"model": interrupted.ctx.model.state_dict(), "opt": interrupted.ctx.optimizer.state_dict(),
                           "strategy": interrupted.state_dict()})
    restored = _strategy(comm, **cfg)
    restored.ctx.model.load_state_dict(saved["model"])
    restored.ctx.optimizer.load_state_dict(saved["opt"])
    restored.load_state_dict(saved["strategy"])
    for t in range(6, 13):
        interrupted.train_step(_batch(comm.rank, t), 1e-2)
    for t in range(6, 13):
        restored.train_step(_batch(comm.rank, t), 1e-2)
    in_flight = [s["fragment"] for s in saved["strategy"]["outer"]["in_flight"]]
    return in_flight, _flat(straight), _flat(interrupted), _flat(restored)


def test_state_dict_round_trip_with_a_sync_in_flight_continues_identically(two_ranks):
    for in_flight, straight, interrupted, restored in (r["round_trip"] for r in two_ranks):
        assert in_flight == [0]
        for a, b, c in zip(straight, interrupted, restored):
            assert np.array_equal(a, b) and np.array_equal(a, c)


def _nan_sync(comm) -> str:
    s = _strategy(comm, sync_every=1, compression={"name": "int", "bits": 8})
    with torch.no_grad():
        s.ctx.model.head.weight[0, 0] = float("nan")
    try:
        s.train_step(_batch(comm.rank, 1), 1e-2)
    except ValueError as err:
        return str(err)
    return "no error"


def test_a_nonfinite_outer_gradient_raises_instead_of_being_sent(two_ranks):
    for message in (r["nan"] for r in two_ranks):
        assert "inf or nan" in message



def _finish_in_flight(comm) -> tuple:
    """H=8, P=2, tau=3: after step 17 fragment 0's sync (started at 16) is in flight; no sync starts
    in steps 18-19, so a run to step 19 merges exactly it (at 19)."""
    cfg = dict(sync_every=8, fragments=2, overlap_steps=3, merge_alpha=0.5)
    ended, longer = _strategy(comm, **cfg), _strategy(comm, **cfg)
    for t in range(1, 18):
        ended.train_step(_batch(comm.rank, t), 1e-2)
    for t in range(1, 20):
        longer.train_step(_batch(comm.rank, t), 1e-2)
    stale = _flat(ended)[1]
    in_flight = [s.fragment for s in ended.outer.in_flight]
    report = ended.finish_syncs()
    return in_flight, report, stale, _flat(ended)[1], _flat(longer)[1]


def test_finish_merges_the_syncs_in_flight_so_the_final_global_params_include_every_sync(two_ranks):
    for in_flight, report, stale, finished, scheduled in (r["finish"] for r in two_ranks):
        assert in_flight == [0] and report == {"diloco/merged": 1, "diloco/in_flight": 0}
        assert not np.array_equal(stale, scheduled), "without finish the last sync is missing"
        assert np.array_equal(finished, scheduled), "finish must give the global params the merge at 19 gives"
    assert np.array_equal(two_ranks[0]["finish"][3], two_ranks[1]["finish"][3])


# -- through the Coordinator on the session Ray cluster --------------------------------------
def _train(cfg) -> tuple[list[torch.Tensor], list[torch.Tensor], Coordinator]:
    """Train to the end; (global parameters, local parameters) of each replica, and the coordinator."""
    coord, glob, states = train_and_collect(cfg, "flat_parameters", "state_dict")
    local = [torch.cat([t.reshape(-1) for t in s["replica"]["model"].values()]) for s in states]
    return glob, local, coord


@pytest.mark.ray
def test_diloco_with_h1_outer_sgd_lr1_equals_ddp(ray_cluster, tmp_path):
    common = ["train.steps=10", "cluster.num_workers=4", "model.n_layer=2", "optim.name=sgd", "optim.lr=0.05",
              "optim.grad_clip=0", "optim.warmup_steps=3"]
    ddp, _, _ = _train(small_cfg(tmp_path, *common, "run.name=ddp"))
    diloco, _, _ = _train(small_cfg(tmp_path, *common, "run.name=diloco", "strategy=diloco", "strategy.sync_every=1",
                                 "strategy.outer_lr=1", "strategy.outer_momentum=0"))
    for p in diloco[1:]:
        assert torch.equal(p, diloco[0]), "global parameters differ across replicas"
    diff = (diloco[0] - ddp[0]).abs().max().item()
    print(f"max abs diff diloco(H=1) vs ddp: {diff:.2e}")
    assert diff <= 1e-5


def vanilla_diloco_reference(cfg, world: int) -> torch.Tensor:
    """W replicas in one process: H inner steps each, mean outer gradient, outer Nesterov SGD, copy back."""
    data = build_dataset(cfg.data, cfg.seed)
    sampler = GlobalSampler(data.num_train, cfg.seed)
    models = [build_model(cfg.model, data.vocab_size, 0, cfg.data.seq_len, cfg.seed) for _ in range(world)]
    opts = [build_optimizer(m.parameters(), cfg.optim) for m in models]
    glob = [p.detach().clone() for p in models[0].parameters()]
    momentum = [torch.zeros_like(g) for g in glob]
    s, bs = cfg.strategy, cfg.data.batch_size
    for step in range(1, cfg.train.steps + 1):
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        for r, (model, opt) in enumerate(zip(models, opts)):
            x, y = data.train_batch(sampler.indices((step - 1) * world * bs + r * bs, bs))
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        if step % s.sync_every:
            continue
        for i, g in enumerate(glob):
            delta = sum((g - list(m.parameters())[i].detach()) for m in models) / world
            momentum[i] = s.outer_momentum * momentum[i] + delta
            g -= s.outer_lr * (delta + s.outer_momentum * momentum[i])
        for m in models:
            with torch.no_grad():
                for p, g in zip(m.parameters(), glob):
                    p.copy_(g)
    return torch.cat([g.reshape(-1) for g in glob])


@pytest.mark.ray
def test_vanilla_diloco_equals_a_single_process_reference(ray_cluster, tmp_path):
    cfg = small_cfg(tmp_path, "train.steps=9", "cluster.num_workers=2", "model.n_layer=2", "strategy=diloco",
                    "strategy.sync_every=3", "optim.warmup_steps=2")
    params, _, _ = _train(cfg)
    assert torch.equal(params[0], params[1]), "global parameters differ across replicas"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = vanilla_diloco_reference(cfg, 2)
    finally:
        torch.set_num_threads(threads)
    diff = (params[0] - reference).abs().max().item()
    print(f"max abs diff diloco vs single-process reference: {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_streaming_diloco_resumes_a_checkpoint_with_a_sync_in_flight_like_an_uninterrupted_run(
        ray_cluster, tmp_path):
    common = ["train.steps=10", "checkpoint.every=5", "cluster.num_workers=2", "model.n_layer=2",
              "strategy=streaming_diloco", "strategy.sync_every=4", "strategy.overlap_steps=3",
              "train.eval_every=5"]
    coord = Coordinator(small_cfg(tmp_path, *common, "run.name=interrupted"))
    try:
        coord.train(until_step=7)
    finally:
        coord.close()
    resumed_global, resumed_local, coord = _train(small_cfg(tmp_path, *common, "run.name=interrupted",
                                                            "resume=true"))
    assert coord.step == 10
    straight_global, straight_local, _ = _train(small_cfg(tmp_path, *common, "run.name=straight"))
    for a, b in zip(resumed_global + resumed_local, straight_global + straight_local):
        assert torch.equal(a, b)
    assert not torch.equal(straight_local[0], straight_local[1]), "replicas should differ between syncs"
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/loss" in x]
    assert [x["step"] for x in evals] == [5, 10] and all("eval/loss_replica_avg" in x for x in evals)
    steps = {x["step"]: x for x in lines if "train/loss" in x}
    assert steps[5]["diloco/in_flight"] == 1 and steps[4]["diloco/fragment"] == 0
    assert steps[10]["diloco/bytes_total"] == sum(steps[t]["diloco/bytes_this_step"] for t in steps)
