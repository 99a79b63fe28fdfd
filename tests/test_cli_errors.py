"""User errors: exit code 2, one line naming the key, the value and what is allowed; no Ray touched."""

import subprocess
import sys

import pytest

from raylane import train

pytestmark = pytest.mark.timeout(120)

CASES = [
    (["strategy=nope"], "strategy", "nope", "ddp"),
    (["cluster.num_workers=0"], "cluster.num_workers", "0", ">= 1"),
    (["optim.lr=-0.1"], "optim.lr", "-0.1", "> 0"),
]


@pytest.mark.parametrize("overrides,key,value,allowed", CASES)
def test_user_error_exits_2_with_one_line_naming_key_value_allowed(overrides, key, value, allowed):
    env = {"RAY_ADDRESS": "127.0.0.1:9", "PATH": "/usr/bin:/bin"}  # any Ray contact would fail loudly
    proc = subprocess.run([sys.executable, "-m", "raylane.train", *overrides], capture_output=True, text=True,
                          timeout=90, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and value in lines[0] and allowed in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("overrides,key,value,allowed", CASES)
def test_user_error_starts_no_ray(monkeypatch, capsys, overrides, key, value, allowed):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("ray.init called for an invalid config")

    monkeypatch.setattr(ray, "init", no_ray)
    assert train.main(overrides) == 2
    assert key in capsys.readouterr().err


def test_unknown_key_and_bad_type_are_one_line_errors(capsys):
    assert train.main(["optim.lrr=1"]) == 2
    assert train.main(["train.steps=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "optim.lrr" in err[0] and "unknown key" in err[0]
    assert "train.steps" in err[1] and "integer" in err[1]
