"""The gnnpipe engine in one process (one stage holding every layer: no communication), against the
whole-graph model: historical embeddings reach the exact values once the parameters stop moving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raylane.strategies.gnn.engine import Peers, StageEngine
from raylane.strategies.gnn.partition import locality_rank, split_blocks
from raylane.workers.graphs import GraphConfig, csbm
from raylane.workers.models import ModelConfig, build_model


def _setup(name: str, chunks: int, stale_gradients: bool):
    g = csbm(GraphConfig(num_vertices=300), 3, 8, 0)
    model = build_model(ModelConfig(name=name, n_layer=3, d_model=8), 3, 8, 0, 0)
    logits = model(g.x, g.edge_index)
    loss = F.cross_entropy(logits[g.train_mask], g.y[g.train_mask])
    loss.backward()
    exact = {n: p.grad.clone() for n, p in model.named_parameters()}
    blocks = split_blocks(torch.arange(g.num_vertices), locality_rank(g.edge_index, g.num_vertices), chunks)
    engine = StageEngine(model, g, None, Peers(None, None), blocks, torch.zeros(g.num_vertices, dtype=torch.long),
                         0, 1 / g.num_train, stale_gradients=stale_gradients)
    return model, engine, loss.item(), exact


def _epoch(model, engine, epoch, order, exact):
    """One chunked epoch; (its result, the largest gradient error against the whole-graph model)."""
    model.zero_grad()
    out = engine.train_epoch(order, epoch)
    return out, max(float((p.grad - exact[n]).abs().max()) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ["gcn", "sage", "gcnii"])
def test_with_fixed_parameters_chunked_epochs_reach_the_exact_loss_and_with_stale_gradients_the_exact_gradients(name):
    model, engine, loss, exact = _setup(name, chunks=4, stale_gradients=True)
    first, err1 = _epoch(model, engine, 1, [2, 0, 3, 1], exact)
    assert first["stale_reads"] > 0 and first["staleness_epochs"] == 1.0 and err1 > 1e-4  # zeros of "epoch 0"
    for epoch in range(2, 8):  # staleness propagates one level per epoch, then vanishes
        out, err = _epoch(model, engine, epoch, [2, 0, 3, 1], exact)
    assert out["loss"] == pytest.approx(loss, abs=1e-6) and err < 1e-5


def test_without_stale_gradients_the_historical_rows_gradients_are_dropped():
    model, engine, loss, exact = _setup("gcn", chunks=4, stale_gradients=False)
    for epoch in range(1, 8):
        out, err = _epoch(model, engine, epoch, [0, 1, 2, 3], exact)
    assert out["loss"] == pytest.approx(loss, abs=1e-6) and err > 1e-4


def test_one_chunk_is_the_whole_graph_model_from_the_first_epoch():
    model, engine, loss, exact = _setup("gcnii", chunks=1, stale_gradients=False)
    out, err = _epoch(model, engine, 1, [0], exact)
    assert out["stale_reads"] == 0 and out["loss"] == pytest.approx(loss, abs=1e-6) and err < 1e-6


def test_warmup_epochs_run_as_one_chunk_then_the_pipeline_reads_history_and_state_round_trips():
    from raylane.strategies.base import WorkerContext
    from raylane.strategies.gnn.gnnpipe import GnnPipeConfig, GnnPipeWorker

    g = csbm(GraphConfig(num_vertices=200), 3, 8, 0)
    model = build_model(ModelConfig(name="sage", n_layer=2, d_model=8), 3, 8, 0, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ctx = WorkerContext(model, opt, None, None, 0.0, 0, 1, 0, data=g)  # one stage, no peers: no comm
    worker = GnnPipeWorker(GnnPipeConfig(chunks=3, warmup_epochs=2, stage_layers=[2]), ctx)
    reads = [worker.train_step(worker.make_batch(0), 0.01)["stale_reads"] for _ in range(3)]
    assert reads[0] == reads[1] == 0 < reads[2]
    state, local = worker.state_dict(), worker.local_state_dict()
    assert state == {"epoch": 3} and set(local["tables"]) == {"1"}
    fresh = GnnPipeWorker(GnnPipeConfig(chunks=3, warmup_epochs=2, stage_layers=[2]), ctx)
    fresh.load_state_dict(state)
    fresh.load_local_state_dict(local)
    assert fresh.epoch == 3 and torch.equal(fresh.engine.tables[1], worker.engine.tables[1])
    ev = worker.evaluate(1)
    assert ev["model"][1] == int(g.val_mask.sum()) and ev["test/accuracy"][1] == int(g.test_mask.sum())
