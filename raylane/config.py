"""Structured configs for every group, their validation, and Hydra composition.

`load(overrides)` composes configs/ (config.yaml + groups) with Hydra's compose API,
then validates the whole tree into a `RunConfig` before anything starts. Every user
error — an unknown group option, an unknown key, a wrong type, a value out of range —
is a `ConfigError` whose message is one line naming the key, the value and what is
allowed. The dataclasses of models, data and optimizer live beside their code
(workers/); a strategy's lives in its module and is found through the registry.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import logging

from raylane import preflight, strategies
from raylane.orchestrator import rundir
from raylane.orchestrator.faults import FaultsConfig
from raylane.workers.chaos import GRADIENT_MODES, ROW_MODES, WIRE_MODES
from raylane.validation import ConfigError, check, from_dict, one_of
from raylane.workers.data import DataConfig
from raylane.workers.gnn_models import GNN_MODELS
from raylane.workers.graphs import GRAPH_DATASETS
from raylane.workers.models import ModelConfig
from raylane.workers.optim import OptimConfig

GROUPS = ("strategy", "model", "data", "cluster", "logging", "faults")

log = logging.getLogger("raylane")


def config_dir() -> Path:
    """configs/ beside the package (editable install / source tree), or $RAYLANE_CONFIG_DIR."""
    env = os.environ.get("RAYLANE_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    steps: int = 300
    eval_every: int = 50           # 0: only at the end
    log_every: int = 10            # console/W&B aggregation period (metrics.jsonl gets every step)

    def validate(self, prefix: str) -> None:
        check(self.steps >= 1, f"{prefix}.steps", self.steps, "must be >= 1")
        check(self.eval_every >= 0, f"{prefix}.eval_every", self.eval_every, "must be >= 0")
        check(self.log_every >= 1, f"{prefix}.log_every", self.log_every, "must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 100               # 0: only at the end
    keep: int = 3                  # newest checkpoints kept

    def validate(self, prefix: str) -> None:
        check(self.every >= 0, f"{prefix}.every", self.every, "must be >= 0")
        check(self.keep >= 1, f"{prefix}.keep", self.keep, "must be >= 1")


@dataclass
class ClusterConfig:
    num_workers: int = 4
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    min_workers: int | None = None  # elastic: continue with this many when replacements can't be placed
    address: str | None = None     # Ray address; default $RAY_ADDRESS, else an embedded local cluster
    backend: str = "auto"          # auto (nccl with GPUs, else gloo) | gloo | nccl
    collective_timeout_s: float = 60.0
    start_timeout_s: float = 120.0  # actors must be up by then
    connect_timeout_s: float = 30.0  # cluster.address / $RAY_ADDRESS must answer by then
    replace_timeout_s: float = 30.0  # a replacement not up by then: shrink (if min_workers allows) or fail
    round_timeout_s: float = 600.0   # no reply to a round by then: the silent workers are hung
    max_step_failures: int = 3       # the same step failing this often in a row is not transient: stop
    ranks_per_replica: int = 1       # ranks that train one replica together (strategy=hsdp/replica_diloco)
    reuse_workers: bool = True       # a finished run's healthy worker processes serve the next run in this driver

    def validate(self, prefix: str) -> None:
        check(self.num_workers >= 1, f"{prefix}.num_workers", self.num_workers, "must be >= 1")
        check(self.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        check(self.gpus_per_worker >= 0, f"{prefix}.gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        one_of(f"{prefix}.backend", self.backend, ("auto", "gloo", "nccl"))
        check(not (self.backend == "nccl" and self.gpus_per_worker == 0), f"{prefix}.backend", self.backend,
              "nccl needs cluster.gpus_per_worker > 0")
        check(self.collective_timeout_s > 0, f"{prefix}.collective_timeout_s", self.collective_timeout_s,
              "must be > 0")
        check(self.start_timeout_s > 0, f"{prefix}.start_timeout_s", self.start_timeout_s, "must be > 0")
        check(self.connect_timeout_s > 0, f"{prefix}.connect_timeout_s", self.connect_timeout_s, "must be > 0")
        check(self.replace_timeout_s > 0, f"{prefix}.replace_timeout_s", self.replace_timeout_s, "must be > 0")
        check(self.round_timeout_s > 0, f"{prefix}.round_timeout_s", self.round_timeout_s, "must be > 0")
        check(self.max_step_failures >= 1, f"{prefix}.max_step_failures", self.max_step_failures, "must be >= 1")
        check(self.min_workers is None or 1 <= self.min_workers <= self.num_workers, f"{prefix}.min_workers",
              self.min_workers, f"must be in [1, cluster.num_workers={self.num_workers}]")
        check(self.ranks_per_replica >= 1 and self.num_workers % self.ranks_per_replica == 0,
              f"{prefix}.ranks_per_replica", self.ranks_per_replica,
              f"must be >= 1 and divide cluster.num_workers={self.num_workers}")
        check(self.min_workers is None or self.min_workers % self.ranks_per_replica == 0, f"{prefix}.min_workers",
              self.min_workers, f"must be a multiple of cluster.ranks_per_replica={self.ranks_per_replica} "
              f"(a replica is dropped or kept whole)")

    @property
    def replicas(self) -> int:
        """Replicas of `ranks_per_replica` ranks each."""
        return self.num_workers // self.ranks_per_replica

    @property
    def floor(self) -> int:
        """The fewest workers training may continue with."""
        return self.num_workers if self.min_workers is None else self.min_workers

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.gpus_per_worker > 0 else "gloo"


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"    # offline | online | disabled
    project: str = "raylane"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    progress: bool = True          # live progress bar on stderr

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


def in_ray_job_copy(cwd: Path | None = None) -> bool:
    """True inside the temporary copy of a `ray job submit --working-dir` upload."""
    return "runtime_resources" in (cwd or Path.cwd()).parts


@dataclass
class RunDirConfig:
    name: str = "run"
    root: str = "runs"
    dir: str | None = None         # default: <root>/<name>

    def validate(self, prefix: str) -> None:
        check(self.name not in ("", ".", "..") and not any(c in self.name for c in "/\\\0"), f"{prefix}.name",
              self.name, "must be a plain folder name (no '/' or '\\', not '.' or '..'); a path goes in run.dir")
        check(not self.name.startswith("~"), f"{prefix}.name", self.name,
              "must not start with '~' (it would be taken as a home folder); a path goes in run.dir")

    def path(self) -> Path:
        """The run directory. A relative path is taken from the current directory, except in a
        Ray job's temporary working-dir copy, where it is taken from $RAYLANE_HOME (default
        ~/raylane) so that nothing lands in a folder Ray deletes."""
        return _resolve(Path(self.dir or Path(self.root) / self.name))

    def root_path(self) -> Path:
        return _resolve(Path(self.root))


def _resolve(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_absolute() and in_ray_job_copy():
        path = Path(os.environ.get("RAYLANE_HOME", Path.home() / "raylane")) / path
    return path.resolve()


@dataclass
class RunConfig:
    strategy: Any
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    cluster: ClusterConfig
    logging: LoggingConfig
    run: RunDirConfig
    faults: FaultsConfig
    seed: int = 0
    resume: bool | str = "auto"    # auto: continue an unfinished run in run.dir, else start fresh

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
             "checkpoint": CheckpointConfig, "cluster": ClusterConfig, "logging": LoggingConfig,
             "run": RunDirConfig, "faults": FaultsConfig}


def validate(raw: dict[str, Any]) -> RunConfig:
    """Typed, range-checked RunConfig from a plain dict (the composed, resolved config)."""
    allowed = {"strategy", "seed", "resume", *_SECTIONS}
    for key in raw:
        check(key in allowed, key, raw[key], f"unknown key; allowed keys: {sorted(allowed)}")
    strat = dict(raw.get("strategy") or {})
    spec = strategies.get(strat.get("name", "ddp"))
    check("engine" not in strat or getattr(spec.worker_cls, "hosts_replicas", False), "strategy.engine",
          strat.get("engine"), f"strategy={_chosen(spec.name, strat)} can't host an inner engine; use "
          f"{_replica_alternative(spec.name)}")
    sections = {k: from_dict(cls, raw.get(k), k) for k, cls in _SECTIONS.items()}
    seed, resume = raw.get("seed", 0), raw.get("resume", "auto")
    check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "seed", seed,
          "must be an integer >= 0")
    check(isinstance(resume, bool) or resume == "auto", "resume", resume, "must be true, false or auto")
    cfg = RunConfig(strategy=from_dict(spec.config_cls, strat, "strategy"), seed=seed, resume=resume,
                    **sections)
    cfg.faults.validate_ranks(cfg.cluster.num_workers)
    _check_driver_crash(cfg)
    rows = getattr(cfg.strategy, "aggregates_rows", False)  # e.g. diloco with strategy.outer.aggregator
    for i, e in enumerate(cfg.faults.events):  # gradient-level attacks need a strategy that lets a worker forge
        check(e.kind != "byzantine" or e.mode not in GRADIENT_MODES or getattr(spec.worker_cls, "forges_gradients",
                                                                                False) or (rows and e.mode in ROW_MODES),
              f"faults.events[{i}].mode", e.mode, f"needs a strategy that exchanges gradients (strategy=robust) or "
              f"gathers outer gradients (strategy.outer.aggregator; not label_flip); "
              f"strategy={cfg.strategy.name} takes only {list(WIRE_MODES)}")
    check(cfg.cluster.ranks_per_replica == 1 or getattr(spec.worker_cls, "hosts_replicas", False),
          "cluster.ranks_per_replica", cfg.cluster.ranks_per_replica,
          f"strategy={_chosen(cfg.strategy.name, strat)} trains one rank per replica; multi-rank replicas need "
          f"{_replica_alternative(cfg.strategy.name)}")
    check_run = getattr(cfg.strategy, "check_run", None)  # a strategy's checks against the whole run
    if check_run is not None:
        check_run(cfg)
    for warning in getattr(cfg.strategy, "warn_run", lambda run: [])(cfg):  # legal but likely surprising
        log.warning("%s", warning)
    if cfg.model.name in GNN_MODELS or cfg.data.name in GRAPH_DATASETS:  # whole-graph training
        check(getattr(spec.worker_cls, "full_graph", False), "strategy.name", cfg.strategy.name,
              f"model={cfg.model.name} data={cfg.data.name} trains on a whole graph: strategy=gnnpipe or graph_parallel")
    elif cfg.model.name == "char_transformer":
        check(cfg.data.name == "chars", "data.name", cfg.data.name, "model=char_transformer needs data=chars")
    elif cfg.model.name == "cnn":
        check(cfg.data.name == "digits", "data.name", cfg.data.name, "model=cnn needs image data: data=digits")
    else:
        check(cfg.data.name != "chars", "data.name", cfg.data.name,
              f"model={cfg.model.name} needs feature data: data=synthetic or data=digits")
    preflight.check(cfg)  # a usable run.root, a W&B key when online (reads only)
    rundir.check(cfg)  # the run dir and resume, against what is on disk (reads only)
    return cfg


def _chosen(name: str, strat: dict) -> str:
    """The preset the user picked, as far as the keys tell: streaming_diloco is diloco with fragments."""
    return "streaming_diloco" if name == "diloco" and (strat.get("fragments") or 1) > 1 else name


def _replica_alternative(name: str) -> str:
    """The multi-rank-replica strategy to suggest instead of `name`."""
    if name == "diloco":
        return "strategy=replica_diloco (DiLoCo across multi-rank replicas; strategy.fragments > 1 streams it)"
    return "strategy=hsdp (or strategy=replica_diloco)"


def _check_driver_crash(cfg: RunConfig) -> None:
    """A driver crash must come after a checkpoint, or "run the same command again" starts over."""
    for i, e in enumerate(cfg.faults.events):
        if e.kind != "driver_crash" or e.step is None:
            continue
        every = cfg.checkpoint.every
        check(0 < every < e.step, f"faults.events[{i}].step", e.step,
              f"a driver_crash needs a checkpoint before it to resume from: set checkpoint.every in [1, {e.step - 1}]"
              f" (now {every})")


def default_run_name(choices: dict[str, Any], raw: dict[str, Any]) -> str:
    """`<strategy preset>-<model preset>[-<faults preset>]`: the presets the user chose, so that
    `strategy=gc` and `strategy=m_sgc`, or a run with and without a fault plan, never share a dir."""
    name = f"{choices.get('strategy') or 'ddp'}-{choices.get('model') or 'model'}"
    faults = choices.get("faults") or "none"
    if faults != "none":
        name += f"-{faults}"
    elif (raw.get("faults") or {}).get("events"):
        name += "-faults"  # an inline plan (+faults.events=[...]) on the `none` preset
    return name.replace("/", "_")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.get_key_element().lstrip("+~")
        if key in GROUPS and ov.value() is not None:
            choices = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
            for value in choices:
                one_of(key, value, _options(key))


def compose(overrides: list[str]) -> dict[str, Any]:
    """Compose configs/ with Hydra; returns the resolved config as a plain dict."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    check(config_dir().is_dir(), "RAYLANE_CONFIG_DIR", str(config_dir()), "no configs/ folder there")
    if not OmegaConf.has_resolver("raylane.data"):  # files shipped in the package, e.g. a straggler trace
        OmegaConf.register_new_resolver("raylane.data", lambda rel: str(Path(__file__).parent / "data" / rel))
    try:
        _check_group_choices(overrides)
        with initialize_config_dir(str(config_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        raw = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e, overrides)) from None
    run = raw.get("run")
    if isinstance(run, dict) and run.get("name") is None:
        run["name"] = default_run_name(choices, raw)
    return raw


def _one_line(e: Exception, overrides: list[str]) -> str:
    text, cause = str(e), e.__cause__ or e.__context__
    while cause is not None:
        text, cause = text + "\n" + str(cause), cause.__cause__ or cause.__context__
    for ov in overrides:
        key = ov.partition("=")[0]
        if f"'{key}'" in text and ("not in struct" in text or "Could not override" in text):
            return f"{ov}: unknown key {key!r}; check the spelling, or prefix it with + to add a key"
    return text.strip().split("\n")[0] or type(e).__name__


def load(overrides: list[str]) -> RunConfig:
    return validate(compose(overrides))
