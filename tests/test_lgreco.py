"""lgreco on spawned Gloo ranks (no Ray): every rank applies the same levels and ends with the same
parameters; a run stopped mid-way and resumed from its state dicts (through torch.save and a
weights-only load) matches an uninterrupted run bit for bit; a failed step changes nothing."""

import io

import pytest
import torch

from raylane.comm import host_store
from raylane.workers.optim import lr_at
from raylane.workers.worker import TrainWorker
from tests.conftest import small_cfg
from tests.multiproc import run_ranks

pytestmark = pytest.mark.timeout(120)

WORLD, STEPS, SPLIT = 3, 12, 7
LGRECO = ["strategy=lgreco", "strategy.family=mixed", "strategy.warmup_steps=3", "strategy.adjust_every=3",
          "strategy.accumulate_steps=2", "strategy.min_numel=256", "strategy.default_level=int:4:128",
          f"train.steps={STEPS}", f"cluster.num_workers={WORLD}", "optim.warmup_steps=2"]


def _run(worker, cfg, first, last):
    history = []
    for step in range(first, last + 1):
        offset = (step - 1) * WORLD * cfg.data.batch_size
        metrics = worker.train_step(offset, lr_at(step, cfg.train.steps, cfg.optim))
        history.append((worker.strategy.levels(), metrics["bytes_sent"]))
    return history


def _worker(cfg, rank, port, gen):
    worker = TrainWorker(cfg, rank)
    worker.connect("127.0.0.1", port, gen, rank, WORLD, "gloo", 30.0)
    return worker


def _straight_and_resumed(comm, cfg, port):
    rank = comm.rank
    straight = _worker(cfg, rank, port, 0)
    history = _run(straight, cfg, 1, STEPS)
    first = _worker(cfg, rank, port, 1)
    _run(first, cfg, 1, SPLIT)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed = _worker(cfg, rank, port, 2)
    resumed.load_state_dict(state["replica"], state["local"])
    _run(resumed, cfg, SPLIT + 1, STEPS)
    residuals = straight.strategy.local_state_dict()["residuals"]
    out = io.BytesIO()  # tensors leave a spawned process as bytes: a shared-memory handle dies with it
    torch.save((history, straight.flat_parameters(), resumed.flat_parameters(), residuals), out)
    return out.getvalue()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    cfg = small_cfg(tmp_path_factory.mktemp("lgreco"), *LGRECO)
    store = host_store("127.0.0.1")
    try:
        saved = run_ranks(_straight_and_resumed, WORLD, cfg, store.port, timeout_s=90)
        return [torch.load(io.BytesIO(b), weights_only=True) for b in saved]
    finally:
        del store


def test_every_rank_applies_identical_levels_and_parameters(ranks):
    histories = [h for h, *_ in ranks]
    levels = [[lv for lv, _ in h] for h in histories]
    assert all(lv == levels[0] for lv in levels[1:])
    assert all(set(lv.values()) == {"none"} for lv in levels[0][:3])  # warm-up: full precision
    chosen = levels[0][-1]
    assert any(v != "none" for v in chosen.values()), "no layer was compressed after warm-up"
    sent_warm = sum(b for _, b in histories[0][:3])
    sent_late = sum(b for _, b in histories[0][-3:])
    assert sent_late < sent_warm / 2, "compression did not reduce the bytes sent"
    assert all(torch.equal(p, ranks[0][1]) for _, p, _, _ in ranks)
    # error feedback is per rank: the residuals differ because the data shards do
    assert any(not torch.equal(ranks[0][3][k], ranks[1][3][k]) for k in ranks[0][3])


def test_resumed_from_state_dicts_matches_uninterrupted_run_bit_for_bit(ranks):
    for _, straight, resumed, _ in ranks:
        assert torch.equal(straight, resumed)


def test_a_step_that_fails_mid_sync_changes_no_strategy_state(tmp_path):
    overrides = [o for o in LGRECO if not o.startswith(("strategy.family", "strategy.default", "cluster."))]
    cfg = small_cfg(tmp_path, *overrides, "strategy.family=powersgd", "strategy.default_level=powersgd:2",
                    "cluster.num_workers=1")
    store = host_store("127.0.0.1")
    worker = TrainWorker(cfg, 0)
    worker.connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    for step in range(1, 6):  # past warm-up and one choice: residuals and warm-start factors exist
        worker.train_step((step - 1) * cfg.data.batch_size, 1e-3)
    strategy = worker.strategy
    before = (strategy.state_dict(), strategy.local_state_dict())
    assert before[1]["residuals"] and before[0]["warm_q"]
    calls, original = [], strategy._reduced

    def fail_on_third(bucket, result):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("peer died")
        original(bucket, result)
    strategy._reduced = fail_on_third
    with pytest.raises(RuntimeError, match="peer died"):
        worker.train_step(5 * cfg.data.batch_size, 1e-3)
    after = (strategy.state_dict(), strategy.local_state_dict())
    assert before[0]["steps_done"] == after[0]["steps_done"] and before[0]["levels"] == after[0]["levels"]
    for b, a in zip(before, after):
        for part in ("warm_q", "residuals", "accum"):
            if part in b:
                assert b[part].keys() == a[part].keys()
                assert all(torch.equal(b[part][k], a[part][k]) for k in b[part])
