"""The run directory is decided at config validation, before Ray starts or anything is written: it stays
inside run.root unless run.dir says otherwise; only a raylane run is ever moved aside; resume=true needs a
checkpoint; a checkpoint is resumed only by a config that can load it, and config.yaml is not touched by
one that cannot. No Ray."""

import os

import pytest
import torch

from raylane import train
from raylane.orchestrator import checkpoint
from raylane.orchestrator.rundir import prepare_run_dir
from raylane.validation import ConfigError
from tests.conftest import SMALL, small_cfg

pytestmark = pytest.mark.timeout(60)


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _finished_run(cfg, summary: bool = True):
    """A run dir as a run leaves it: config.yaml, metrics.jsonl, a checkpoint (+ summary.yaml)."""
    path = cfg.run.path()
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("original\n")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    checkpoint.save(path / "checkpoints", 3, {"driver": {"step": 3}, "replica": {"w": torch.zeros(2)}},
                    {"config": cfg.to_dict()}, keep=1)
    if summary:
        (path / "summary.yaml").write_text("steps: 3\n")
    return path


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/etc", "..\\up", ""])
def test_a_run_name_that_is_not_a_plain_folder_name_is_a_config_error(tmp_path, name):
    with pytest.raises(ConfigError, match=r"^run\.name=.*: must be a plain folder name") as err:
        small_cfg(tmp_path, f"run.name='{name}'")
    assert "\n" not in str(err.value)


def test_a_run_name_linked_outside_run_root_is_a_config_error(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"^run\.name='linked': the run dir .* resolves outside run\.root"):
        small_cfg(tmp_path / "runs", "run.name=linked")


@pytest.mark.parametrize("how", ["dot", "foreign_dir"])
def test_the_current_dir_or_a_foreign_folder_is_a_config_error_and_never_moved(tmp_path, monkeypatch, how):
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    monkeypatch.chdir(home)
    before = _tree(tmp_path)
    target = "." if how == "dot" else str(home)
    for resume in ("auto", "false", "true"):
        with pytest.raises(ConfigError, match=r"^run\.dir=.*is not empty and is not a raylane run") as err:
            small_cfg(tmp_path, f"run.dir={target}", f"resume={resume}")
        assert "\n" not in str(err.value)
    assert _tree(tmp_path) == before


def test_the_current_dir_is_never_moved_aside_even_when_it_holds_a_run(tmp_path, monkeypatch):
    run = _finished_run(small_cfg(tmp_path, "run.name=done"))
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match=r"^run\.dir='\.': .* is the current directory"):
        small_cfg(tmp_path, "run.dir=.", "resume=false")
    assert (run / "config.yaml").read_text() == "original\n"


def test_a_finished_raylane_run_is_moved_aside_and_nothing_else(tmp_path):
    cfg = small_cfg(tmp_path, "run.name=done")
    run = _finished_run(cfg)
    (tmp_path / "unrelated").mkdir()
    contents = _tree(run)
    assert prepare_run_dir(small_cfg(tmp_path, "run.name=done")) == run
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("done.")]
    assert len(aside) == 1 and _tree(aside[0]) == contents
    assert list(run.iterdir()) == [] and (tmp_path / "unrelated").is_dir()


def test_resume_true_without_a_checkpoint_is_a_config_error_and_auto_starts_fresh(tmp_path):
    for prepared in (False, True):  # no run dir at all / a run dir with no checkpoint in it
        if prepared:
            (tmp_path / "fresh").mkdir()
            (tmp_path / "fresh" / "config.yaml").write_text("x: 1\n")
        with pytest.raises(ConfigError, match=r"^resume=True: no valid checkpoint in .*fresh/checkpoints; "
                                              r"resume=auto or resume=false starts a fresh run$"):
            small_cfg(tmp_path, "run.name=fresh", "resume=true")
    cfg = small_cfg(tmp_path, "run.name=fresh", "resume=auto")
    prepare_run_dir(cfg)
    assert cfg.resume is False


def test_resume_auto_continues_an_unfinished_run(tmp_path):
    run = _finished_run(small_cfg(tmp_path, "run.name=crashed"), summary=False)
    cfg = small_cfg(tmp_path, "run.name=crashed")
    assert prepare_run_dir(cfg) == run and cfg.resume is True
    assert (run / "config.yaml").read_text() == "original\n"


def test_a_resume_with_another_model_size_fails_before_ray_and_leaves_config_yaml_alone(tmp_path, monkeypatch,
                                                                                       capsys):
    run = _finished_run(small_cfg(tmp_path, "run.name=small", "model.d_model=32"), summary=False)
    monkeypatch.setattr(train, "connect_ray", lambda cluster: pytest.fail("Ray must not start"))
    for resume in ("true", "auto"):
        code = train.main([*SMALL, f"run.root={tmp_path}", "run.name=small", "model.d_model=64",
                           f"resume={resume}"])
        err = capsys.readouterr().err.strip()
        assert code == train.EXIT_USER_ERROR and "\n" not in err
        assert err.startswith("error: model.d_model=64: the checkpoint ") and "model.d_model=32" in err
    assert (run / "config.yaml").read_text() == "original\n"
    assert sorted(os.listdir(tmp_path)) == ["small"]
