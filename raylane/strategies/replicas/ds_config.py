"""The DeepSpeed config a replica runs with: the user's own (`strategy.ds_config`) under the keys raylane owns.

`strategy.ds_config` is a path to a DeepSpeed JSON or YAML file, or an inline mapping. It is read once,
at validation on the driver (`load`), and travels to the workers as a mapping. `merged(cfg)` is what
`deepspeed.initialize` and `zero.Init` get: the user's config with raylane's keys set over it.

raylane owns (a user value that differs is a one-line ConfigError naming both, before Ray starts):
- `train_micro_batch_size_per_gpu` = data.batch_size / gradient_accumulation_steps and `train_batch_size`
  = that x GAS x cluster.ranks_per_replica (the user chooses `gradient_accumulation_steps`: a rank's batch
  of data.batch_size samples is cut into that many micro-batches, one optimizer step per raylane step);
- `gradient_clipping` (optim.grad_clip; 0 where raylane clips itself: hsdp with clip=global, ZeRO-0);
- `zero_optimization.stage` (strategy.zero_stage; taken from the user's config when the strategy leaves it
  null), `zero_optimization.stage3_param_persistence_threshold` (0: every parameter partitioned, so that
  the fp32 partition is the whole truth a checkpoint keeps), the ZeRO-3 limits
  `stage3_max_live_parameters` / `stage3_prefetch_bucket_size` / `stage3_max_reuse_distance`
  (strategy.max_live_parameters / prefetch_bucket_size / max_reuse_distance when set);
- `optimizer`, `scheduler` (raylane builds them from optim.*), `zero_allow_untested_optimizer` (true),
  `zero_force_ds_cpu_optimizer` (false: offload steps raylane's torch optimizer).
Defaults raylane sets unless the user does: `comms_logger.enabled` false (it syncs the device after every
collective), `steps_per_print` never. fp16 is refused where DeepSpeed has no fp16 (a CPU without it),
mixed precision at ZeRO-0 and bf16 with fp32 gradient accumulation at ZeRO-1 (DeepSpeed's
FP16_Unfused / BF16 optimizers, whose master copies the replica engine does not drive).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from raylane.validation import ConfigError, check

_STAGE3_LIMITS = {"max_live_parameters": "stage3_max_live_parameters",
                  "prefetch_bucket_size": "stage3_prefetch_bucket_size",
                  "max_reuse_distance": "stage3_max_reuse_distance"}


def load(value: Any, key: str) -> dict[str, Any]:
    """The user's DeepSpeed config: {} for None, a mapping as is, a path read as JSON or YAML."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return copy.deepcopy(dict(value))
    check(isinstance(value, str), key, value, "must be a path to a DeepSpeed JSON/YAML file or a mapping")
    path = Path(value).expanduser()
    check(path.is_file(), key, value, "no such file (a DeepSpeed JSON or YAML config)")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except ValueError as err:
        raise ConfigError(f"{key}={value!r}: not valid {path.suffix.lstrip('.') or 'JSON/YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    check(isinstance(data, dict), key, value, "the file must hold a mapping (a DeepSpeed config)")
    return data


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from None


def _conflict(key: str, user: Any, ours: str, value: Any) -> None:
    raise ConfigError(f"strategy.ds_config.{key}={user!r} conflicts with {ours}={value!r}: raylane sets "
                      f"{key} from {ours}; drop it from the DeepSpeed config or change {ours}")


def _same(user: dict, key: str, value: Any, ours: str) -> None:
    if key in user and user[key] != value and not (_num(user[key]) and _num(value) and
                                                    float(user[key]) == float(value)):
        _conflict(key, user[key], ours, value)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def resolve(cfg: Any, prefix: str) -> None:
    """Read `cfg.ds_config` into a mapping and settle `cfg.zero_stage` (the strategy's, else the user's
    zero_optimization.stage, else 1); checks what needs no other config group."""
    user = load(cfg.ds_config, f"{prefix}.ds_config")
    zero = user.get("zero_optimization") or {}
    check(isinstance(zero, dict), f"{prefix}.ds_config.zero_optimization", zero, "must be a mapping")
    if cfg.zero_stage is None:
        cfg.zero_stage = zero.get("stage", 1)
    elif "stage" in zero and zero["stage"] != cfg.zero_stage:
        _conflict("zero_optimization.stage", zero["stage"], f"{prefix}.zero_stage", cfg.zero_stage)
    for key in ("optimizer", "scheduler"):
        if key in user:
            _conflict(key, user[key], "optim", "raylane's optimizer and schedule (optim.name, optim.schedule)")
    if zero.get("stage3_param_persistence_threshold", 0) != 0:
        _conflict("zero_optimization.stage3_param_persistence_threshold", zero["stage3_param_persistence_threshold"],
                  f"{prefix}.zero_stage", f"{cfg.zero_stage} (raylane partitions every parameter: 0)")
    for ours, theirs in _STAGE3_LIMITS.items():
        mine = getattr(cfg, ours)
        check(mine is None or mine >= 1, f"{prefix}.{ours}", mine, "must be null or >= 1")
        if mine is not None and theirs in zero and zero[theirs] != mine:
            _conflict(f"zero_optimization.{theirs}", zero[theirs], f"{prefix}.{ours}", mine)
    cfg.ds_config = user
    _check_precision(user, cfg.zero_stage, prefix)


def _enabled(user: dict, key: str) -> bool:
    section = user.get(key) or {}
    return bool(section.get("enabled", False)) if isinstance(section, dict) else bool(section)


def _check_precision(user: dict, stage: int, prefix: str) -> None:
    mixed = [k for k in ("fp16", "bf16", "bfloat16") if _enabled(user, k)]
    check(not mixed or stage >= 1, f"{prefix}.ds_config.{mixed[0] if mixed else 'bf16'}.enabled", True,
          f"mixed precision needs {prefix}.zero_stage >= 1 (at ZeRO-0 DeepSpeed wraps the optimizer in its "
          "FP16_Unfused optimizer, whose fp32 copy the replica engine does not drive)")
    accum = (user.get("data_types") or {}).get("grad_accum_dtype")
    check(not (mixed and mixed[0] != "fp16" and stage == 1 and accum in ("fp32", "float32", "float")),
          f"{prefix}.ds_config.data_types.grad_accum_dtype", accum,
          "bf16 with fp32 gradient accumulation at ZeRO-1 selects DeepSpeed's BF16 optimizer, which the replica "
          "engine does not drive; use zero_stage 2 or 3, or drop grad_accum_dtype")


def check_run(cfg: Any, run: Any, prefix: str = "strategy") -> None:
    """Checks against the run: gradient accumulation vs data.batch_size, clipping vs optim.grad_clip, fp16
    where DeepSpeed has it. Binds what `merged` needs (batch size, clipping) into `cfg`."""
    user = cfg.ds_config
    ga = user.get("gradient_accumulation_steps", 1)
    check(_num(ga) and int(ga) == ga and ga >= 1 and run.data.batch_size % int(ga) == 0,
          f"{prefix}.ds_config.gradient_accumulation_steps", ga,
          f"must be an integer >= 1 dividing data.batch_size={run.data.batch_size} (a rank's batch is cut into "
          "that many micro-batches)")
    cfg.batch_size, cfg.grad_clip = run.data.batch_size, run.optim.grad_clip
    micro = run.data.batch_size // int(ga)
    _same(user, "train_micro_batch_size_per_gpu", micro, "data.batch_size / gradient_accumulation_steps")
    _same(user, "train_batch_size", micro * int(ga) * cfg.ranks_per_replica,
          "data.batch_size x cluster.ranks_per_replica")
    _same(user, "gradient_clipping", run.optim.grad_clip, "optim.grad_clip")
    if _enabled(user, "fp16"):
        check(run.cluster.gpus_per_worker > 0 or _cpu_has_fp16(), f"{prefix}.ds_config.fp16.enabled", True,
              "DeepSpeed's CPU accelerator has no fp16 on this CPU (no oneDNN fp16); use bf16 on CPU, fp16 "
              "with cluster.gpus_per_worker >= 1")


def _cpu_has_fp16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def merged(cfg: Any, ds_clips: bool) -> dict[str, Any]:
    """The config `deepspeed.initialize` / `zero.Init` get. `ds_clips`: DeepSpeed clips (else raylane does)."""
    out = copy.deepcopy(cfg.ds_config)
    ga = int(out.get("gradient_accumulation_steps", 1))
    micro = max(1, cfg.batch_size // ga)
    zero = dict(out.get("zero_optimization") or {})
    zero.update(stage=cfg.zero_stage, stage3_param_persistence_threshold=0)
    zero.update({theirs: getattr(cfg, ours) for ours, theirs in _STAGE3_LIMITS.items()
                 if getattr(cfg, ours) is not None})
    out.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=ga,
               train_batch_size=micro * ga * cfg.ranks_per_replica,
               gradient_clipping=float(cfg.grad_clip) if ds_clips else 0.0, zero_optimization=zero,
               zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False)
    out.setdefault("steps_per_print", 2**62)
    out.setdefault("comms_logger", {"enabled": False})
    return out


def mixed_dtype(user: dict) -> Any:
    """The model's dtype under this config (torch.float32 when neither fp16 nor bf16 is on)."""
    import torch

    if _enabled(user, "fp16"):
        return torch.float16
    if _enabled(user, "bf16") or _enabled(user, "bfloat16"):
        return torch.bfloat16
    return torch.float32
