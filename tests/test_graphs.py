"""Graph data, the GNN family's parts, partitions and the gnnpipe config checks (no processes)."""

from __future__ import annotations

import pytest
import torch

from raylane import config
from raylane.strategies.gnn.common import BestValidation
from raylane.strategies.gnn.partition import locality_rank, partition, partition_stats, split_blocks, subgraph
from raylane.strategies.gnn.gnnpipe import GnnPipeConfig, GnnPipeWorker, stage_split
from raylane.validation import ConfigError
from raylane.workers.graphs import REPO, GraphConfig, csbm, karate, load_folder
from raylane.workers.models import ModelConfig, build_model

GRAPH = ["model=gcn", "data=csbm", "model.n_layer=4", "model.d_model=8", "data.graph.num_vertices=200",
         "logging=quiet"]


def _folder(tmp_path, edges="0 1\n1 2\n2 3\n", features="1 0\n0 1\n1 1\n0 0\n", labels="0\n1\n0\n1\n"):
    for name, text in (("edges.txt", edges), ("features.txt", features), ("labels.txt", labels)):
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def test_csbm_is_seeded_homophilous_and_split_into_disjoint_masks():
    cfg = GraphConfig(num_vertices=3000, homophily=0.9)
    a, b, c = csbm(cfg, 4, 16, 0), csbm(cfg, 4, 16, 0), csbm(cfg, 4, 16, 1)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.x, b.x)
    assert not torch.equal(a.edge_index, c.edge_index)
    src, dst = a.edge_index
    assert (src != dst).all() and 0.85 < (a.y[src] == a.y[dst]).float().mean() < 0.95
    masks = torch.stack([a.train_mask, a.val_mask, a.test_mask]).int()
    assert (masks.sum(0) == 1).all() and a.num_train == int(a.train_mask.sum()) == 1500
    assert a.classification and a.vocab_size == 4 and a.input_dim == 16


def test_karate_club_ships_inside_torch_geometric():
    g = karate(GraphConfig())
    assert (g.num_vertices, g.vocab_size, g.edge_index.shape[1], g.num_train) == (34, 4, 156, 4)
    assert not (g.train_mask & (g.val_mask | g.test_mask)).any()


def test_a_graph_folder_loads_undirected(tmp_path):
    g = load_folder(_folder(tmp_path), GraphConfig())
    assert g.num_vertices == 4 and g.edge_index.shape[1] == 6 and g.input_dim == 2 and g.vocab_size == 2


@pytest.mark.parametrize("files, message", [
    ({"edges": "0 1\n1 x\n"}, "edges.txt line 2: expected two vertex ids"),
    ({"edges": "0 1\n# ok\n1 9\n"}, "edges.txt line 3: vertex id 9 out of range"),
    ({"features": "1 0\n0 1\n1\n0 0\n"}, "features.txt line 3: 1 features, but earlier rows have 2"),
    ({"features": "1 0\n0 a\n1 1\n0 0\n"}, "features.txt line 2: expected numbers"),
    ({"labels": "0\n1\n-1\n1\n"}, "labels.txt line 3: expected one class id"),
    ({"features": "1 0\n0 1\n"}, "features.txt has 2 rows but labels.txt has 4 labels"),
])
def test_a_malformed_graph_file_is_a_one_line_config_error_naming_file_and_line(tmp_path, files, message):
    path = _folder(tmp_path, **files)
    with pytest.raises(ConfigError) as err:
        config.load(["strategy=graph_parallel", "model=gcn", "data=graph", f"data.path={path}",
                     f"run.root={tmp_path}/runs"])
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith(f"data.path={path!r}")


def test_a_missing_graph_file_is_named(tmp_path):
    _folder(tmp_path)
    (tmp_path / "labels.txt").unlink()
    with pytest.raises(ConfigError, match="labels.txt is missing"):
        load_folder(str(tmp_path), GraphConfig())


def test_sparse_features_and_split_files_load(tmp_path):
    path = _folder(tmp_path, features="0:1\n1:2.5\n0:0\n1:1 0:1\n")
    for name, ids in (("train.txt", "0\n"), ("val.txt", "1\n3\n"), ("test.txt", "2\n")):
        (tmp_path / name).write_text(ids)
    g = load_folder(path, GraphConfig(normalize_features=True))
    assert torch.equal(g.x, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.5]]))
    assert (g.train_mask.sum(), g.val_mask.sum(), g.test_mask.sum()) == (1, 2, 1) and bool(g.val_mask[3])


@pytest.mark.parametrize("splits, message", [
    ({"train.txt": "0\n", "val.txt": "1\n"}, "has train.txt, val.txt but not test.txt"),
    ({"train.txt": "0\n", "val.txt": "1\n7\n", "test.txt": "2\n"}, "val.txt line 2: expected one vertex id in 0..3"),
    ({"train.txt": "0\nx\n", "val.txt": "1\n", "test.txt": "2\n"}, "train.txt line 2: expected one vertex id"),
    ({"train.txt": "0\n", "val.txt": "1\n", "test.txt": "2\n0\n"}, "test.txt line 2: vertex 0 is listed twice"),
    ({"train.txt": "# none\n", "val.txt": "1\n", "test.txt": "2\n"}, "train.txt lists no vertices"),
])
def test_bad_split_files_are_one_line_config_errors(tmp_path, splits, message):
    path = _folder(tmp_path)
    for name, text in splits.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        load_folder(path, GraphConfig())
    assert message in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("data.path=")


CORA = REPO / "../shared/data/graphs/cora"


@pytest.mark.skipif(not CORA.is_dir(), reason="the shared Cora folder is not on this machine")
def test_the_cora_preset_reproduces_the_public_split(tmp_path):
    data = config.compose(["strategy=graph_parallel", "model=gcn", "data=cora"])["data"]  # the preset, unvalidated
    g = load_folder(data["path"], GraphConfig(**data["graph"]))
    assert (g.num_vertices, g.input_dim, g.vocab_size, g.edge_index.shape[1]) == (2708, 1433, 7, 2 * 5278)
    assert (int(g.train_mask.sum()), int(g.val_mask.sum()), int(g.test_mask.sum())) == (140, 500, 1000)
    assert torch.allclose(g.x.sum(1)[g.x.sum(1) > 0], torch.ones(1))  # rows normalised


def test_a_missing_graph_folder_is_a_one_line_error_naming_both_lookups(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        config.load(["strategy=graph_parallel", "model=gcn", "data=cora", "data.path=../nowhere/cora"])
    text = str(err.value)
    assert text.startswith("data.path='../nowhere/cora': must be a folder") and str((REPO / "../nowhere/cora").resolve()) in text
    assert "\n" not in text


def test_best_validation_reports_the_test_accuracy_of_the_best_validation_epoch_and_stops_on_patience():
    best = BestValidation(patience=2)
    for step, val, test in ((1, 0.5, 0.4), (2, 0.7, 0.6), (3, 0.7, 0.9), (4, 0.6, 0.95)):
        out = best.observe(step, val, test)
        assert not best.stopped or step == 4
    assert out == {"eval/best_val_accuracy": 0.7, "eval/test_accuracy_at_best_val": 0.6, "eval/best_val_step": 2}
    assert best.stopped
    again = BestValidation()
    again.load_state_dict(best.state_dict())
    assert again.best_step == 2 and not again.stopped  # patience 0: never stops


@pytest.mark.parametrize("name", ["gcn", "sage", "gcnii"])
def test_a_part_holds_exactly_the_whole_models_layers(name):
    cfg = ModelConfig(name=name, n_layer=5, d_model=8)
    whole = build_model(cfg, 3, 6, 0, seed=7)
    first = build_model(cfg, 3, 6, 0, 7, part={"layers": [0, 2]})
    last = build_model(cfg, 3, 6, 0, 7, part={"layers": [2, 5]})
    ws = whole.state_dict()
    for part, a in ((first, 0), (last, 2)):
        for key, value in part.state_dict().items():
            if key.startswith("convs."):
                _, j, rest = key.split(".", 2)
                key = f"convs.{int(j) + a}.{rest}"
            assert torch.equal(value, ws[key]), key
    assert hasattr(first, "input") and not hasattr(first, "head")
    assert hasattr(last, "head") and not hasattr(last, "input")


def test_metis_and_rcm_partitions_cover_every_vertex_once_and_metis_cuts_far_fewer_edges():
    g = csbm(GraphConfig(num_vertices=2000), 4, 8, 0)
    owner = {m: partition(g.edge_index, g.num_vertices, 4, m) for m in ("metis", "rcm")}
    for m, o in owner.items():  # one part id per vertex, every part used, balanced
        assert o.shape == (2000,) and o.min() == 0 and o.max() == 3
        assert torch.bincount(o).max() <= 1.05 * 500, m
    assert torch.equal(owner["metis"], partition(g.edge_index, g.num_vertices, 4))  # the default, deterministic
    cut = {m: partition_stats(g.edge_index, o) for m, o in owner.items()}
    assert cut["metis"]["edge_cut_fraction"] < 0.5 * cut["rcm"]["edge_cut_fraction"]
    assert 0 < cut["metis"]["halo_rows"] < cut["rcm"]["halo_rows"]


def test_partitions_are_balanced_and_subgraphs_keep_every_in_edge():
    g = csbm(GraphConfig(num_vertices=500), 4, 8, 0)
    owner = partition(g.edge_index, g.num_vertices, 3, "rcm")
    assert sorted(torch.bincount(owner).tolist()) == [166, 167, 167]
    mine = torch.nonzero(owner == 1).flatten()
    sg = subgraph(mine, g.edge_index, None, g.num_vertices, owner)
    table = sg.sources()
    got = {(int(table[s]), int(mine[d])) for s, d in sg.edge_index.t()}
    want = {(int(s), int(d)) for s, d in g.edge_index.t() if owner[d] == 1}
    assert got == want and (owner[sg.halo] != 1).all()
    chunks = split_blocks(mine, locality_rank(g.edge_index, g.num_vertices), 4)
    assert torch.equal(torch.sort(torch.cat(chunks)).values, mine) and len(chunks) == 4


def test_stages_split_layers_contiguously_and_balanced():
    assert stage_split(8, 4, 0.5) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stage_split(10, 4, 0.5) == [(0, 2), (2, 4), (4, 7), (7, 10)]
    assert stage_split(6, 2, given=[4, 2]) == [(0, 4), (4, 6)]


def test_gnnpipe_config_errors_are_one_line(tmp_path):
    root = f"run.root={tmp_path}"
    with pytest.raises(ConfigError, match=r"cluster.num_workers=4: gnnpipe needs a layer per stage: .* 4 stages > "
                                          r"model.n_layer=3"):
        config.load(["strategy=gnnpipe", *GRAPH, "model.n_layer=3", root])
    with pytest.raises(ConfigError, match="strategy.data_parallel=3: must divide cluster.num_workers=4"):
        config.load(["strategy=gnnpipe", *GRAPH, "strategy.data_parallel=3", root])
    with pytest.raises(ConfigError, match=r"strategy.stage_layers=\[1, 1\]: must list 4 stages"):
        config.load(["strategy=gnnpipe", *GRAPH, "strategy.stage_layers=[1,1]", root])
    with pytest.raises(ConfigError, match="model.name='mlp': strategy=gnnpipe trains a GNN"):
        config.load(["strategy=gnnpipe", "model=mlp", "data=csbm", root])
    with pytest.raises(ConfigError, match="strategy.name='ddp': model=gcn data=csbm trains on a whole graph"):
        config.load(["strategy=ddp", *GRAPH, root])
    with pytest.raises(ConfigError, match=r"strategy.partitioner='kl': choose one of \['metis', 'rcm'\]"):
        config.load(["strategy=hybrid", *GRAPH, "strategy.partitioner=kl", root])


def test_gnnpipe_layout_builds_one_stage_per_rank_and_orders_chunks_by_a_shared_seed(tmp_path):
    cfg = config.load(["strategy=gnnpipe", *GRAPH, "model.n_layer=6", f"run.root={tmp_path}"])
    layout = GnnPipeWorker.layout(cfg.strategy, 4)
    assert [p["layers"] for p in layout.parts] == [[0, 1], [1, 2], [2, 4], [4, 6]]
    assert layout.state_keys == ("stage_0", "stage_1", "stage_2", "stage_3") and not layout.elastic
    worker = GnnPipeWorker.__new__(GnnPipeWorker)
    worker.cfg, worker.ctx = GnnPipeConfig(chunks=5), type("Ctx", (), {"seed": 3})()
    orders = [worker.chunk_order(e, 5) for e in (1, 2, 1)]
    assert orders[0] == orders[2] and sorted(orders[0]) == list(range(5)) and orders[0] != orders[1]
