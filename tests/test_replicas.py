"""Multi-rank replicas (strategies hsdp and replica_diloco, engines torch and deepspeed): the layout,
config errors, and equivalences on real TrainWorkers in plain processes over Gloo (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylane import config
from raylane.strategies import get
from raylane.validation import ConfigError
from tests.conftest import SMALL
from benchmarks._replica_procs import train_ranks

pytestmark = pytest.mark.timeout(240)

SGD = ["optim.name=sgd", "optim.lr=0.1", "optim.schedule=constant", "optim.grad_clip=0"]


def _cfg(tmp_path, *overrides: str):
    return config.load([*SMALL, f"run.root={tmp_path}", *overrides])


def _reference(cfg, steps: int, clip: float = 0.0) -> tuple[list[float], np.ndarray, float]:
    """ddp over cluster.num_workers ranks, in one process: one optimizer step per global batch on the
    mean of the ranks' losses (equal slices, so the mean gradient is ddp's averaged gradient), clipped
    to `clip` (0: not) as ddp clips. Returns the loss curve, the final flat parameters and their mean
    eval loss."""
    from raylane.workers.optim import lr_at
    from raylane.workers.worker import TrainWorker

    ref_cfg = _with(cfg, strategy=get("ddp").config_cls())
    w = TrainWorker(ref_cfg, 0)
    world, bs, losses = cfg.cluster.num_workers, cfg.data.batch_size, []
    for step in range(1, steps + 1):
        offset = (step - 1) * world * bs
        w.optimizer.zero_grad()
        parts = [w._loss(w.data.train_batch(w.sampler.indices(offset + r * bs, bs))) for r in range(world)]
        loss = torch.stack(parts).mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(w.model.parameters()), clip)
        for g in w.optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.train.steps, cfg.optim)
        w.optimizer.step()
        losses.append(loss.item())
    w.model.eval()
    with torch.no_grad():
        eval_loss = float(np.mean([w._loss(w.data.eval_batch(i, bs)).item() for i in range(cfg.data.eval_batches)]))
    return losses, torch.cat([p.detach().reshape(-1) for p in w.model.parameters()]).numpy(), eval_loss


def _with(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def _mean_curve(results: list[dict]) -> np.ndarray:
    return np.mean([r["losses"] for r in results], axis=0)


# -- layout and config (no processes) ---------------------------------------------------------
def test_layout_has_inner_groups_per_replica_and_outer_groups_per_local_rank(tmp_path):
    cfg = _cfg(tmp_path, "strategy=replica_diloco", "cluster.num_workers=6", "cluster.ranks_per_replica=3",
               "strategy.engine=deepspeed")
    layout = get("replica_diloco").worker_cls.layout(cfg.strategy, 6)
    assert layout.groups == {"inner": ((0, 1, 2), (3, 4, 5)), "outer": ((0, 3), (1, 4), (2, 5))}
    assert layout.state_keys[4] == "replica_1_shard_1" and layout.elastic and layout.unit == 3  # whole replicas
    hsdp = _cfg(tmp_path, "strategy=hsdp", "cluster.ranks_per_replica=2", "strategy.engine=deepspeed")
    assert get("hsdp").worker_cls.layout(hsdp.strategy, 4).state_keys == ("shard_0", "shard_1") * 2
    plain = _cfg(tmp_path, "strategy=hsdp", "cluster.ranks_per_replica=2")  # engine=torch: replicated state
    assert get("hsdp").worker_cls.layout(plain.strategy, 4).state_keys == ("replica",) * 4
    assert _cfg(tmp_path, "strategy=ddp").cluster.replicas == 4  # the flat default: 4 replicas x 1


@pytest.mark.parametrize("overrides, message", [
    (["cluster.ranks_per_replica=3"], "cluster.ranks_per_replica=3: must be >= 1 and divide cluster.num_workers=4"),
    (["strategy=diloco", "cluster.ranks_per_replica=2"], "multi-rank replicas need strategy=replica_diloco"),
    (["strategy=robust", "+strategy.engine=deepspeed"], "strategy=robust can't host an inner engine"),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.zero_stage=4"],
     "strategy.zero_stage=4: choose one of [0, 1, 2, 3]"),
    (["strategy=hsdp", "strategy.engine=fsdp"], "strategy.engine='fsdp': choose one of ['torch', 'deepspeed']"),
    (["strategy=replica_diloco", "strategy.engine=deepspeed", "strategy.zero_stage=3", "strategy.sync_every=4",
      "strategy.fragments=2"], "strategy.fragments=2: must be 1 with engine=deepspeed zero_stage=3"),
    (["strategy=hsdp", "strategy.zero_stage=3"], "strategy.zero_stage=3: engine=torch replicates"),
    (["strategy=hsdp", "strategy.ds_config={bf16:{enabled:true}}"], "strategy.ds_config={'bf16'"),
    (["strategy=streaming_diloco", "cluster.ranks_per_replica=2"],
     "strategy=streaming_diloco trains one rank per replica; multi-rank replicas need strategy=replica_diloco"),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.ds_config={gradient_clipping:0.5}"],
     "strategy.ds_config.gradient_clipping=0.5 conflicts with optim.grad_clip=1.0"),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.zero_stage=2",
      "strategy.ds_config={zero_optimization:{stage:3}}"],
     "strategy.ds_config.zero_optimization.stage=3 conflicts with strategy.zero_stage=2"),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.ds_config={train_micro_batch_size_per_gpu:3}"],
     "strategy.ds_config.train_micro_batch_size_per_gpu=3 conflicts with data.batch_size / gradient_accum"),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.ds_config={optimizer:{type:Adam}}"],
     "strategy.ds_config.optimizer={'type': 'Adam'} conflicts with optim="),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.ds_config={gradient_accumulation_steps:3}"],
     "strategy.ds_config.gradient_accumulation_steps=3: must be an integer >= 1 dividing data.batch_size=4"),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.zero_stage=0", "strategy.ds_config={bf16:{enabled:true}}"],
     "strategy.ds_config.bf16.enabled=True: mixed precision needs strategy.zero_stage >= 1"),
    (["strategy=hsdp", "strategy.engine=deepspeed", "strategy.ds_config=/no/such/ds.json"],
     "strategy.ds_config='/no/such/ds.json': no such file"),
])
def test_bad_replica_config_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fp16_on_a_cpu_without_it_is_refused_before_ray_starts(tmp_path):
    from raylane.strategies.replicas.ds_config import _cpu_has_fp16

    if _cpu_has_fp16():
        pytest.skip("this CPU has oneDNN fp16: DeepSpeed's CPU accelerator takes fp16 here")
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, "strategy=hsdp", "strategy.engine=deepspeed", "strategy.ds_config={fp16:{enabled:true}}")
    assert "DeepSpeed's CPU accelerator has no fp16 on this CPU" in str(err.value) and "\n" not in str(err.value)


def test_users_ds_config_file_is_merged_under_raylanes_keys(tmp_path):
    """A YAML file (a JSON one alike) with the user's precision, accumulation and ZeRO-3 tuning: raylane
    derives the batch sizes, keeps clipping, stage and persistence, sets the exposed ZeRO-3 limits and
    leaves the comms logger off; the user's own keys pass through."""
    from raylane.strategies.replicas.ds_config import merged

    path = tmp_path / "ds.yaml"
    path.write_text("bf16: {enabled: true}\ngradient_accumulation_steps: 2\nactivation_checkpointing: "
                    "{partition_activations: true}\nzero_optimization: {stage: 3, stage3_prefetch_bucket_size: 500}\n")
    cfg = _cfg(tmp_path, "strategy=hsdp", "strategy.engine=deepspeed", "cluster.ranks_per_replica=2",
               f"strategy.ds_config={path}", "strategy.max_live_parameters=1000", "optim.grad_clip=0.5")
    assert cfg.strategy.zero_stage == 3  # from the user's file
    out = merged(cfg.strategy, ds_clips=True)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == (2, 2, 8)
    assert out["gradient_clipping"] == 0.5 and out["bf16"] == {"enabled": True}
    assert out["activation_checkpointing"] == {"partition_activations": True}
    assert out["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 500, "stage3_param_persistence_threshold": 0,
                                        "stage3_max_live_parameters": 1000}
    assert out["comms_logger"] == {"enabled": False} and merged(cfg.strategy, ds_clips=False)["gradient_clipping"] == 0
    (tmp_path / "ds.json").write_text('{"comms_logger": {"enabled": true}}')
    asked = _cfg(tmp_path, "strategy=hsdp", "strategy.engine=deepspeed", f"strategy.ds_config={tmp_path / 'ds.json'}")
    assert merged(asked.strategy, ds_clips=True)["comms_logger"] == {"enabled": True}  # on when asked


def test_a_view_of_a_flat_buffer_is_saved_with_its_own_bytes_only():
    """engine=torch / ZeRO-0 parameters are views of one flat buffer: saved as they are, each would
    carry the whole buffer."""
    import io

    from raylane.workers.worker import compact

    flat = torch.zeros(10_000)
    state = {"a": flat[:100].view(10, 10), "b": [flat[100:200]], "own": torch.ones(50)}
    sizes = []
    for tree in (state, compact(state)):
        buf = io.BytesIO()
        torch.save(tree, buf)
        sizes.append(buf.tell())
    assert sizes[0] > 10_000 * 4 and sizes[1] < 250 * 4 + 3000  # (+ the format's own overhead)
    assert compact(state)["own"] is state["own"]  # no copy where none is needed


# -- equivalences on plain processes ----------------------------------------------------------
def _h1_replica_diloco_equals_ddp(tmp_path, zero_stage: int):
    """replica_diloco, 2 replicas x 2 DeepSpeed ranks, H=1, outer SGD lr=1 without momentum, groups
    re-formed after step 2: its loss curve and (global, gathered) parameters equal ddp's over 4 ranks.
    Returns (cfg, per-rank results, ddp's parameters, ddp's eval loss)."""
    cfg = _cfg(tmp_path, *SGD, "strategy=replica_diloco", "cluster.ranks_per_replica=2", "strategy.sync_every=1",
               "strategy.outer_lr=1", "strategy.outer_momentum=0", "strategy.engine=deepspeed",
               f"strategy.zero_stage={zero_stage}")
    results = train_ranks(cfg, 4, regen_at=2)
    losses, params, eval_loss = _reference(cfg, 4)
    np.testing.assert_allclose(_mean_curve(results), losses, rtol=1e-5)
    for r in results:
        np.testing.assert_allclose(r["params"], params, atol=1e-5)
    return cfg, results, params, eval_loss


def _socket_payload(r: dict) -> int:
    """What a rank wrote to its sockets over its steps after the first (whose report also holds what
    building the engine sent), less Gloo's 48-byte header per message sent and per receive posted
    (benchmarks/comm.py's measure)."""
    return sum(w - 48 * (2 * sent + recv) for w, sent, recv in r["wire"][1:])


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_hsdp_2x2_deepspeed_clips_by_ddps_global_norm_counts_the_socket_bytes_and_saves_ddps_size(tmp_path,
                                                                                                zero_stage):
    """2 replicas x 2 DeepSpeed ranks, optim.grad_clip=1 (binding: the norm exceeds it): the gradient is
    clipped by the norm of the gradient averaged over all replicas, so the run is ddp's to 1e-6.
    ZeRO-0 reduces shard by shard (DeepSpeed's own all-reduce off); ZeRO-3 builds the model under
    zero.Init. Every byte a rank sends (DeepSpeed's collectives included) is counted: the step bytes
    equal what its sockets carried within 1%. A replica's checkpoint parts (one per state key) hold
    each tensor's own bytes: within 10% of ddp's part for the same model and optimizer."""
    import io

    from raylane.workers.worker import TrainWorker

    cfg = _cfg(tmp_path, "optim.name=sgd", "optim.lr=0.2", "optim.schedule=constant", "optim.grad_clip=1",
               "model.d_model=64", "strategy=hsdp", "cluster.ranks_per_replica=2", "strategy.engine=deepspeed",
               f"strategy.zero_stage={zero_stage}")
    results = train_ranks(cfg, 4)
    losses, params, _ = _reference(cfg, 4, clip=1.0)
    assert min(s["grad_norm"] for s in results[0]["steps"]) > 1  # clipping binds at every step
    np.testing.assert_allclose(_mean_curve(results), losses, rtol=1e-6)
    for r in results:
        np.testing.assert_allclose(r["params"], params, atol=1e-6)
        assert sum(s["bytes_sent"] for s in r["steps"][1:]) == pytest.approx(_socket_payload(r), rel=0.01)
        ds_sent = sum(s["deepspeed/bytes_sent"] for s in r["steps"][1:])  # ZeRO-0: raylane's hook reduces
        assert ds_sent > 0 if zero_stage == 3 else ds_sent == 0
    ddp = TrainWorker(_with(cfg, strategy=get("ddp").config_cls()), 0)
    buf = io.BytesIO()
    torch.save({"model": ddp.model.state_dict(), "optimizer": ddp.optimizer.state_dict(), "strategy": {}}, buf)
    keys = get("hsdp").worker_cls.layout(cfg.strategy, 4).state_keys
    saved = sum(results[keys.index(k)]["state_bytes"] for k in set(keys))  # one part per state key
    assert saved == pytest.approx(buf.tell(), rel=0.1)


def test_deepspeed_bf16_with_gradient_accumulation_tracks_the_fp32_loss(tmp_path):
    """The user's DeepSpeed config: bf16 + 2 micro-batches per step (one replica of 2 ranks, ZeRO-2,
    AdamW, grad_clip=1). Its loss curve stays within 2% of fp32 ddp's on the same batches (bf16 keeps
    8 significant bits: ~0.4% per rounding of the weights and activations), and it trains."""
    cfg = _cfg(tmp_path, "strategy=hsdp", "cluster.num_workers=2", "cluster.ranks_per_replica=2",
               "strategy.engine=deepspeed", "strategy.zero_stage=2", "optim.schedule=constant", "optim.lr=0.01",
               "strategy.ds_config={bf16:{enabled:true},gradient_accumulation_steps:2}")
    results = train_ranks(cfg, 8)
    losses, _, _ = _reference(cfg, 8, clip=cfg.optim.grad_clip)
    curve = _mean_curve(results)
    assert np.max(np.abs(curve - losses) / np.asarray(losses)) < 0.02
    assert curve[-1] < 0.9 * curve[0]


def test_replica_diloco_deepspeed_zero1_with_h1_equals_ddp_over_all_ranks(tmp_path):
    """2 replicas x 2 ranks, ZeRO-1 inside, DiLoCo H=1 with outer SGD lr=1 (no momentum) across:
    each outer step sets the parameters to the replicas' mean, which with inner SGD is ddp's step.
    The groups re-form after step 2 (the engine is rebuilt with new fp32 masters: the outer sync
    must follow them)."""
    _, results, params, _ = _h1_replica_diloco_equals_ddp(tmp_path, zero_stage=1)
    m = results[0]["metrics"]
    n = params.size
    assert m["diloco/bytes_this_step"] == 4 * n // 2  # rank 0 sent the outer gradient of its half only
    assert m["engine/optimizer_state_bytes"] == 0 and m["engine/master_bytes"] == 4 * n // 2  # SGD; fp32 half
    # DeepSpeed's own traffic on the replica (ZeRO-1: gradient all-reduce + parameter all-gather)
    assert m["deepspeed/bytes_sent"] == pytest.approx(4 * n * (2 * 1 / 2) + 4 * n / 2, rel=0.01)


def test_replica_diloco_deepspeed_zero3_with_h1_equals_ddp_and_evaluates_in_lock_step(tmp_path):
    """ZeRO-3 keeps only partitions: the outer step writes the fp32 partition back, and evaluation
    (every rank of a replica running the same batches, local rank 0 counting) scores ddp's model.
    The groups re-form after step 2: the engine is rebuilt over the partitioned module, each rank
    keeps its partition and the outer sync follows the new one."""
    cfg, results, _, eval_loss = _h1_replica_diloco_equals_ddp(tmp_path, zero_stage=3)
    total, count = (sum(r["eval"]["global"][i] for r in results) for i in (0, 1))
    assert count == cfg.data.eval_batches  # each batch counted once, by one replica's local rank 0
    assert total / count == pytest.approx(eval_loss, rel=1e-5)


def test_hsdp_zero3_keeps_its_partitions_across_a_regroup_and_scores_accuracy_on_the_same_weights(tmp_path):
    """One replica of 2 ranks, ZeRO-3, AdamW, digits (a classification dataset). After step 3 every rank
    re-forms its groups: the engine is rebuilt over a module whose parameters were partitioned over the
    old group, and each rank keeps its fp32 partition and its AdamW moments (else the run leaves ddp's).
    The lock-step evaluation (parameters gathered inside every forward) gives the eval loss and
    accuracy that the worker's own loop gives on the same (gathered) weights."""
    from raylane.workers.models import loss_fn
    from raylane.workers.worker import TrainWorker

    cfg = config.load(["data=digits", "model=mlp", "model.hidden=[32,32]", "data.batch_size=8",
                       "data.eval_batches=6", "logging=quiet", "train.eval_every=0", "checkpoint.every=0",
                       "optim.schedule=constant", "optim.lr=0.01", f"run.root={tmp_path}", "strategy=hsdp",
                       "cluster.num_workers=2", "cluster.ranks_per_replica=2", "strategy.engine=deepspeed",
                       "strategy.zero_stage=3"])
    results = train_ranks(cfg, 6, regen_at=3)
    losses, params, _ = _reference(cfg, 6)
    np.testing.assert_allclose(_mean_curve(results), losses, rtol=1e-5)
    for r in results:  # gathered inside the replica; AdamW divides by sqrt(v): float noise grows
        np.testing.assert_allclose(r["params"], params, atol=2e-5)
    total, count, correct, samples = (sum(r["eval"][k][i] for r in results)
                                      for k, i in (("model", 0), ("model", 1), ("model/accuracy", 0),
                                                   ("model/accuracy", 1)))
    w = TrainWorker(_with(cfg, strategy=get("ddp").config_cls()), 0)  # the worker's loop, on the same weights
    torch.nn.utils.vector_to_parameters(torch.from_numpy(results[0]["params"]), w.model.parameters())
    w.model.eval()
    want = [0.0, 0, 0, 0]
    with torch.no_grad():
        for i in range(cfg.data.eval_batches):
            x, y = w.data.eval_batch(i, cfg.data.batch_size)
            logits = w.model(x)
            want = [want[0] + loss_fn(logits, y).item(), want[1] + 1, want[2] + int((logits.argmax(-1) == y).sum()),
                    want[3] + y.numel()]
    assert (count, correct, samples) == tuple(want[1:]) and samples == 6 * 8  # each batch once, by one rank
    assert total == pytest.approx(want[0], rel=1e-6)
    assert 0 < correct < samples  # a score, not a constant


def test_deepspeed_zero2_gives_ddps_loss_curve_across_a_regroup(tmp_path):
    """20 AdamW steps of one 2-rank replica (hsdp), DeepSpeed ZeRO-2, against ddp's (one process; engine=torch
    equals it, see the benchmark). The run re-forms its groups after step 10 (a new generation: the engine
    is rebuilt over the new default group and keeps its optimizer state), as after a fault."""
    cfg = _cfg(tmp_path, "strategy=hsdp", "cluster.num_workers=2", "cluster.ranks_per_replica=2",
               "optim.schedule=constant", "strategy.engine=deepspeed", "strategy.zero_stage=2")
    ds_run = train_ranks(cfg, 20, regen_at=10)
    losses, params, _ = _reference(cfg, 20, clip=cfg.optim.grad_clip)
    np.testing.assert_allclose(_mean_curve(ds_run), losses, rtol=1e-4)
    np.testing.assert_allclose(ds_run[0]["params"], params, atol=1e-4)
    n = params.size
    # ZeRO-2: this rank's half of both AdamW moments, and of DeepSpeed's fp32 master copy
    assert ds_run[0]["metrics"]["engine/optimizer_state_bytes"] == pytest.approx(2 * 4 * n / 2, rel=0.01)
    assert ds_run[0]["metrics"]["engine/master_bytes"] == pytest.approx(4 * n / 2, rel=0.01)


def test_streaming_replica_diloco_cuts_fragments_along_shards_alike_for_torch_and_deepspeed(tmp_path):
    """Streaming DiLoCo (P=2 fragments, H=4, tau=1) across 2 replicas x 2 ranks: each rank syncs the
    part of each fragment that lies in its shard. The torch engine's shards (halves of a flat buffer)
    and DeepSpeed ZeRO-1's partitions cut the model differently; the outer step is elementwise, so
    both must give the same run."""
    common = ["strategy=replica_diloco", "cluster.ranks_per_replica=2", "model.n_layer=2", "strategy.sync_every=4",
              "strategy.fragments=2", "strategy.overlap_steps=1", "optim.schedule=constant"]
    torch_run = train_ranks(_cfg(tmp_path, *common), 8)
    ds_run = train_ranks(_cfg(tmp_path, *common, "strategy.engine=deepspeed", "strategy.zero_stage=1"), 8)
    np.testing.assert_allclose(_mean_curve(ds_run), _mean_curve(torch_run), rtol=1e-4)
    for a, b in zip(ds_run, torch_run):
        np.testing.assert_allclose(a["params"], b["params"], atol=1e-4)  # the global (outer) parameters
    n = torch_run[0]["params"].size
    sent = [sum(s["diloco/bytes_this_step"] for s in r["steps"]) for r in torch_run]
    assert sum(sent) == 4 * n * 2 * 2  # every element synced twice (steps 2..8), each by one rank per replica


def test_replicas_benchmark_claims_are_computed_from_its_rows():
    from benchmarks.replicas import H, SYSTEMS, claims_for

    rows = [{"system": s, "inner_bytes_per_step": 100.0 * H * 4, "outer_bytes_per_step": 100.0,
             "optimizer_state_bytes_per_rank": 1000.0 if s == "hsdp zero0" else 500.0, "step_time_s": 1.0}
            for s in SYSTEMS]
    assert all(c["holds"] for c in claims_for(rows))
    rows[2]["optimizer_state_bytes_per_rank"] = 1000.0  # ZeRO-1 no longer shards its optimizer state
    rows[0]["step_time_s"] = 0.1  # engine=torch 10x faster than ZeRO-1
    failed = [c["claim"] for c in claims_for(rows) if not c["holds"]]
    assert failed == ["ZeRO-1 optimizer state per rank / ZeRO-0's", "step time DeepSpeed ZeRO-1 / engine=torch"]
    for r in rows:
        r["inner_bytes_per_step"] = 100.0 * H * 2
    assert [c["holds"] for c in claims_for(rows)][:2] == [True, False]  # fp32 needs >= H, int8 >= 4 x H


def test_replicas_benchmark_memory_claims_are_computed_from_its_rows():
    from benchmarks.replicas import memory_claims

    def row(system, held, peak, params=0):
        return {"system": system, "param_and_optimizer_bytes_per_rank": held, "peak_growth_mb_per_rank": peak,
                "params": params}

    rows = [row("memory zero0", 12.0, 100.0), row("memory zero3", 8.0, 50.0), row("memory zero3 bf16", 7.0, 40.0),
            row("sweep torch d1", 0, 90.0, 10), row("sweep torch d2", 0, 110.0, 20),
            row("sweep zero3 d1", 0, 50.0, 10), row("sweep zero3 d2", 0, 99.0, 20)]
    holds = {c["claim"].split(" (")[0]: c["holds"] for c in memory_claims(rows, cap_mb=100.0)}
    assert list(holds.values()) == [False, True, True, True]  # 8/12 > 0.6; 7/12; 0.5; 20 / 10 params
    rows[-1]["peak_growth_mb_per_rank"] = 101.0  # ZeRO-3's larger model no longer fits: 10 / 10
    assert not memory_claims(rows, cap_mb=100.0)[-1]["holds"]
