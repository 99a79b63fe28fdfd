"""gnnpipe and graph_parallel against a single-process whole-graph model, and their counted bytes.

Real TrainWorkers run as spawned processes over Gloo (benchmarks/_gnn_ranks.py; no Ray), one run
per configuration, each checked for several properties.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks._gnn_ranks import run_workers
from raylane import config
from raylane.comm import wire
from raylane.strategies.gnn.partition import partition, subgraph
from raylane.workers.data import build_dataset
from raylane.workers.models import build_model

pytestmark = pytest.mark.timeout(180)


def _cfg(tmp_path, strategy: str, workers: int, *extra: str):
    return config.load([f"strategy={strategy}", "model=gcnii", "data=csbm", f"cluster.num_workers={workers}",
                        "model.n_layer=4", "model.d_model=8", "data.graph.num_vertices=240", "data.input_dim=12",
                        "data.num_classes=3", "optim.grad_clip=0", "logging=quiet", f"run.root={tmp_path}", *extra])


def _reference(cfg):
    """Loss and gradients of the whole model on the whole graph, in this process."""
    g = build_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, g.vocab_size, g.input_dim, cfg.data.seq_len, cfg.seed)
    logits = model(g.x, g.edge_index)
    loss = F.cross_entropy(logits[g.train_mask], g.y[g.train_mask])
    loss.backward()
    return g, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _whole_name(name: str, first_layer: int) -> str:
    if name.startswith("convs."):
        _, j, rest = name.split(".", 2)
        return f"convs.{int(j) + first_layer}.{rest}"
    return name


def _param_bytes(cfg, g) -> int:
    model = build_model(cfg.model, g.vocab_size, g.input_dim, cfg.data.seq_len, cfg.seed)
    return 4 * sum(p.numel() for p in model.parameters())


def test_gnnpipe_with_one_chunk_equals_the_whole_graph_model_and_sends_the_formula(tmp_path):
    cfg = _cfg(tmp_path, "gnnpipe", 3, "strategy.chunks=1", "model.n_layer=5")
    g, loss, grads = _reference(cfg)
    ranks = run_workers(cfg, epochs=2)
    assert ranks[0]["steps"][0]["loss"] == pytest.approx(loss, abs=1e-5)
    seen = set()
    for r in ranks:
        a = r["part"]["layers"][0]
        for name, grad in r["grads"].items():
            whole = _whole_name(name, a)
            torch.testing.assert_close(grad, grads[whole], atol=1e-5, rtol=1e-4)
            seen.add(whole)
    assert seen == set(grads)  # every parameter lives on exactly one stage
    # bytes per epoch: each boundary carries [h, x0] (2 x width floats) per vertex, forward and backward
    per_boundary = 2 * g.num_vertices * 2 * cfg.model.d_model * 4
    for e in range(2):
        steps = [r["steps"][e] for r in ranks]
        assert sum(s["bytes_sent"] for s in steps) == 2 * per_boundary
        assert steps[0]["gnnpipe/boundary0_bytes"] == steps[0]["gnnpipe/boundary1_bytes"] == per_boundary
        assert steps[0]["gnnpipe/stale_reads"] == 0
    # evaluation runs through the pipeline: only the last stage scores vertices
    assert [r["eval"]["model"][1] for r in ranks] == [0, 0, int(g.val_mask.sum())]


def test_gnnpipe_with_chunks_reads_history_and_still_learns(tmp_path):
    cfg = _cfg(tmp_path, "gnnpipe", 2, "strategy.chunks=4", "data.graph.homophily=0.9")
    ranks = run_workers(cfg, epochs=12, lr=0.03)
    first, last = ranks[0]["steps"][0], ranks[0]["steps"][-1]
    assert first["gnnpipe/stale_reads"] > 0 and first["gnnpipe/staleness_epochs"] == 1.0  # zeros of "epoch 0"
    assert last["gnnpipe/staleness_epochs"] == 1.0  # later: last epoch's rows
    assert last["loss"] < 0.8 * first["loss"]
    # chunking does not change the bytes: every vertex crosses each boundary once each way
    assert sum(r["steps"][0]["bytes_sent"] for r in ranks) == 2 * 240 * 2 * cfg.model.d_model * 4


def test_graph_parallel_equals_the_whole_graph_model_and_sends_the_formula(tmp_path):
    cfg = _cfg(tmp_path, "graph_parallel", 3)
    g, loss, grads = _reference(cfg)
    ranks = run_workers(cfg, epochs=1)
    assert ranks[0]["steps"][0]["loss"] == pytest.approx(loss, abs=1e-5)
    for r in ranks:  # after the allreduce every replica holds the whole graph's gradient
        assert set(r["grads"]) == set(grads)
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, grads[name], atol=1e-5, rtol=1e-4)
    # formula: (L - 1) exchanges, each way, of the rows other parts read + the gradient allreduce
    owner = partition(g.edge_index, g.num_vertices, 3)
    halos = [subgraph(torch.nonzero(owner == q).flatten(), g.edge_index, None, g.num_vertices, owner).halo
             for q in range(3)]
    width, layers, pbytes = cfg.model.d_model, cfg.model.n_layer, _param_bytes(cfg, g)
    for rank, r in enumerate(ranks):
        sent_rows = sum(int((owner[halos[q]] == rank).sum()) for q in range(3) if q != rank)
        recv_rows = sum(int((owner[halos[rank]] == q).sum()) for q in range(3) if q != rank)
        halo_bytes = (layers - 1) * (sent_rows + recv_rows) * width * 4
        allreduce = wire.gloo_allreduce(pbytes, 4, 3, rank).bytes_sent
        assert r["steps"][0]["bytes_sent"] == halo_bytes + allreduce
    assert sum(r["eval"]["test"][1] for r in ranks) == int(g.test_mask.sum())


def _halo_rows(g, owner, ways):
    return [subgraph(torch.nonzero(owner == q).flatten(), g.edge_index, None, g.num_vertices, owner).halo
            for q in range(ways)]


def test_hybrid_with_one_chunk_equals_the_single_process_loss_and_gradient_and_sends_the_formula(tmp_path):
    cfg = _cfg(tmp_path, "gnnpipe", 4, "strategy.data_parallel=2", "strategy.chunks=1")
    from raylane.strategies.gnn.gnnpipe import GnnPipeWorker

    layout = GnnPipeWorker.layout(cfg.strategy, 4)
    assert layout.state_keys == ("stage_0", "stage_0", "stage_1", "stage_1") and not layout.elastic
    assert layout.groups == {"stage": ((0, 1), (2, 3))}
    g, loss, grads = _reference(cfg)
    ranks = run_workers(cfg, epochs=1)
    assert ranks[0]["steps"][0]["loss"] == pytest.approx(loss, abs=1e-5)
    seen = set()
    for r in ranks:  # after the stage's allreduce each way holds its stage's whole-graph gradient
        for name, grad in r["grads"].items():
            whole = _whole_name(name, r["part"]["layers"][0])
            torch.testing.assert_close(grad, grads[whole], atol=1e-5, rtol=1e-4)
            seen.add(whole)
    assert seen == set(grads)
    assert sum(r["eval"]["model"][1] for r in ranks) == int(g.val_mask.sum())
    # bytes: the pipeline carries each way's part; per level the stage group sends the rows the other way
    # reads (forward) and the gradients of the rows it read (backward), and sums the stage's gradients
    owner = partition(g.edge_index, g.num_vertices, 2)
    halos = _halo_rows(g, owner, 2)
    assert ranks[0]["steps"][0]["graph/halo_rows"] == sum(len(h) for h in halos)
    width = cfg.model.d_model
    for rank, r in enumerate(ranks):
        way = rank % 2
        a, b = r["part"]["layers"]
        pipeline = int((owner == way).sum()) * 2 * width * 4  # [h, x0] on, or its gradient back
        rows = int((owner[halos[1 - way]] == way).sum()) + int((owner[halos[way]] == 1 - way).sum())
        exchange = len(range(max(a, 1), b)) * rows * width * 4
        stage_params = build_model(cfg.model, g.vocab_size, g.input_dim, 0, cfg.seed, part=r["part"])
        allreduce = wire.gloo_allreduce(4 * sum(p.numel() for p in stage_params.parameters()), 4, 2, way).bytes_sent
        assert r["steps"][0]["group_bytes_sent"]["stage"] == exchange + allreduce
        assert r["steps"][0]["bytes_sent"] == pipeline + exchange + allreduce


def test_hybrid_with_chunks_reads_history_keeps_the_ways_in_step_and_learns(tmp_path):
    cfg = _cfg(tmp_path, "gnnpipe", 4, "strategy.data_parallel=2", "strategy.chunks=3", "data.graph.homophily=0.9")
    ranks = run_workers(cfg, epochs=8, lr=0.03)
    for a, b in ((0, 1), (2, 3)):  # the two ways of a stage end every epoch with equal gradients
        for name in ranks[a]["grads"]:
            torch.testing.assert_close(ranks[a]["grads"][name], ranks[b]["grads"][name])
    first, last = ranks[0]["steps"][0], ranks[0]["steps"][-1]
    assert first["gnnpipe/stale_reads"] > 0 and last["loss"] < 0.8 * first["loss"]


def test_the_gnn_benchmark_runs_quick_and_computes_its_claims_from_the_rows(tmp_path, monkeypatch):
    import json
    import sys

    from benchmarks import _common, gnn

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["benchmarks/gnn.py", "--part", "csbm-32", "--quick", "--epochs", "2",
                                      "--systems", "graph_parallel,gnnpipe"])
    gnn.main()
    doc = json.loads((tmp_path / "gnn_quick.json").read_text())
    rows = {r["system"]: r for r in doc["rows"]}
    assert set(rows) == {"gnnpipe", "graph_parallel"} and set(doc["runs"]["csbm-32"]["gnnpipe"]) == {"0"}
    ratio = rows["graph_parallel"]["bytes_per_epoch"] / rows["gnnpipe"]["bytes_per_epoch"]
    assert doc["claims"][0]["value"] == round(ratio, 4) and doc["claims"][0]["holds"] == (ratio >= 2)
    assert rows["gnnpipe"]["bytes_per_epoch"] == 2 * 3 * 2000 * 8 * 4  # 3 boundaries, [h] each way
    assert 0 < rows["graph_parallel"]["graph/edge_cut_fraction"] < 0.5  # METIS on a homophilous graph
