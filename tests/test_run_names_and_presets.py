"""Run names come from the presets the user chose; fault presets can do what the README says;
`--help` lists the presets; short DiLoCo runs are warned about at config time (no Ray)."""

import logging
import re
from pathlib import Path

import pytest

from raylane import chaos, config, train
from raylane.validation import ConfigError

pytestmark = pytest.mark.timeout(120)


def _name(*overrides: str) -> str:
    return config.load(list(overrides)).run.name


def test_strategies_sharing_a_module_get_distinct_run_names():
    names = {s: _name(f"strategy={s}") for s in ("gc", "sr_sgc", "m_sgc", "diloco", "streaming_diloco", "ddp")}
    assert names["gc"] == "gc-char_transformer" and names["m_sgc"] == "m_sgc-char_transformer"
    assert names["streaming_diloco"] == "streaming_diloco-char_transformer"
    assert len(set(names.values())) == len(names)


def test_fault_preset_is_in_the_run_name_unless_none():
    assert _name() == "ddp-char_transformer"
    assert _name("faults=crash") == "ddp-char_transformer-crash"
    assert _name("model=mlp", "data=synthetic", "faults=hang") == "ddp-mlp-hang"
    assert _name("+faults.events=[{kind: kill, rank: 1, step: 3}]") == "ddp-char_transformer-faults"
    assert _name("strategy=gc", "run.name=mine") == "mine"


def test_sweep_tag_follows_the_preset_name(tmp_path):
    jobs = train.build_jobs(["strategy=m_sgc", "seed=1,2", f"run.root={tmp_path}"], multirun=True)
    assert [j.run.name for j in jobs] == ["m_sgc-char_transformer__seed=1", "m_sgc-char_transformer__seed=2"]


def test_diloco_with_fewer_than_two_outer_steps_warns_at_config_time(caplog):
    with caplog.at_level(logging.WARNING, logger="raylane"):
        cfg = config.load(["strategy=diloco", "train.steps=30"])
    assert any("0 outer step(s)" in r.message and "sync_every=50" in r.message for r in caplog.records)
    assert cfg.strategy.eval_label(30) == "global (outer) parameters, 0 outer steps"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raylane"):
        config.load(["strategy=diloco", "train.steps=100"])
    assert not [r for r in caplog.records if "outer step" in r.message]


def test_driver_crash_before_the_first_checkpoint_is_a_config_error():
    with pytest.raises(ConfigError, match=r"faults.events\[0\].step=30: .*checkpoint.every in \[1, 29\] \(now 100\)"):
        config.load(["faults=driver_crash", "checkpoint.every=100"])
    cfg = config.load(["faults=driver_crash"])  # the preset itself checkpoints before it crashes
    assert 0 < cfg.checkpoint.every < cfg.faults.events[0].step


@pytest.mark.parametrize("preset", ["hang", "chaos"])
def test_demo_presets_with_a_hang_use_a_short_collective_timeout(preset):
    cfg = config.load([f"faults={preset}"])
    assert cfg.cluster.collective_timeout_s <= 10
    assert config.load([f"faults={preset}", "cluster.collective_timeout_s=3"]).cluster.collective_timeout_s == 3


def preset_overrides(preset: str) -> list[str]:
    """`faults=<preset>` plus the overrides its comment says it needs ("Needs strategy=robust ...")."""
    text = (config.config_dir() / "faults" / f"{preset}.yaml").read_text()
    needs = re.search(r"Needs ((?:[\w.]+=[\w.]*\w ?)+)", text)
    return [f"faults={preset}", *(needs.group(1).split() if needs else [])]


FAULT_PRESETS = sorted(p.stem for p in config.config_dir().joinpath("faults").glob("*.yaml"))


@pytest.mark.parametrize("preset", FAULT_PRESETS)
def test_every_fault_preset_validates_with_the_default_config(preset):
    assert config.load(preset_overrides(preset)).run.name.endswith("" if preset == "none" else f"-{preset}")


def test_stragglers_lambda_preset_finds_its_shipped_trace_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAYLANE_STRAGGLER_TRACE", raising=False)
    model = config.load(["faults=stragglers_lambda"]).faults.events[0].straggler
    trace = Path(model.trace)
    assert trace.is_file() and trace.is_relative_to(Path(config.__file__).parent)
    delays = [model.delay(0, r, 1) for r in range(16)]
    assert min(delays) == 0.0 and max(delays) > 0  # the round's fastest worker is not delayed


def test_train_help_lists_every_group_and_its_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for group, preset in [("strategy", "m_sgc"), ("model", "mlp"), ("data", "synthetic"), ("faults", "driver_crash"),
                          ("+compression@strategy.compression", "int8")]:
        line = next(x for x in out.splitlines() if x.strip().startswith(group + " "))
        assert preset in line.split()
    assert "worker logs" in out


def test_chaos_help_is_argparse_help_not_a_hydra_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        chaos.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "fault-free" in out and "faults " in out and "chaos" in out


def test_chaos_config_error_is_one_line_exit_2(capsys):
    assert chaos.main(["faults=nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: faults=") and "chaos" in err[0]
