"""Bad input is one line on stderr and exit code 2, before Ray starts and before any directory
is touched: unusable data files, run roots, W&B credentials, fault plans and cluster addresses."""

import os
import socket
import subprocess
import sys
import time

import pytest

from raylane import train
from raylane.validation import ConfigError
from raylane.workers.data import CharCorpus, min_corpus_chars
from tests.conftest import SMALL

pytestmark = pytest.mark.timeout(120)


def _fails(capsys, tmp_path, *overrides, root=None):
    """Run the CLI in-process; the one stderr line. The run root is never created."""
    root = root or tmp_path / "runs"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train.main([*SMALL, f"run.root={root}", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created or moved
    return lines[0]


# -- data.path -----------------------------------------------------------------------------
@pytest.mark.parametrize("content,words", [
    (b"", ["is empty"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8\xff", ["not UTF-8 text", "offset 0"]),
    (b"abc\x00def" * 200, ["binary", "NUL"]),
    (b"short text", ["too short (10 chars)", "data.seq_len=32", "needs at least"]),
])
def test_unusable_data_file_is_one_line_error(no_ray, capsys, tmp_path, content, words):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    line = _fails(capsys, tmp_path, f"data.path={path}")
    assert f"data.path={str(path)!r}" in line and all(w in line for w in words), line


@pytest.mark.parametrize("seq_len,eval_fraction", [(32, 0.1), (8, 0.5), (64, 0.01), (3, 0.9)])
def test_validation_accepts_exactly_the_corpora_char_corpus_can_use(seq_len, eval_fraction):
    """min_corpus_chars is the boundary: one char fewer fails at validation and in CharCorpus alike."""
    from raylane.workers.data import check_corpus

    need = min_corpus_chars(seq_len, eval_fraction)
    text = "".join(chr(97 + i % 26) for i in range(need))
    check_corpus(text, seq_len, eval_fraction, "data.path", "x")
    corpus = CharCorpus(text, seq_len, eval_fraction)
    assert corpus.num_train >= 1 and corpus.eval_batch(0, 2)[0].shape == (2, seq_len)
    with pytest.raises(ConfigError, match="needs at least"):
        check_corpus(text[:-1], seq_len, eval_fraction, "data.path", "x")
    with pytest.raises(ConfigError):
        CharCorpus(text[:-1], seq_len, eval_fraction)


# -- run.root ------------------------------------------------------------------------------
def test_run_root_that_is_a_file_is_one_line_error(no_ray, capsys, tmp_path):
    root = tmp_path / "runs"
    root.write_text("not a folder")
    line = _fails(capsys, tmp_path, root=root)
    assert f"run.root={str(root)!r}" in line and "is a file" in line


def test_run_root_under_a_file_cannot_be_created(no_ray, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    root = tmp_path / "afile" / "runs"
    line = _fails(capsys, tmp_path, root=root)
    assert "run.root=" in line and "cannot be created" in line and "is a file" in line


def test_run_root_in_a_folder_this_user_cannot_write_is_one_line_error(no_ray, capsys, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a folder the kernel refuses
        parent = "/proc/1"
        assert not os.access(parent, os.W_OK)
    else:
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o500)
    root = f"{parent}/runs"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train.main([*SMALL, f"run.root={root}"]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"run.root={root!r}" in line and "not writable" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not os.path.exists(root)


def test_run_dir_given_explicitly_checks_its_parent(no_ray, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _fails(capsys, tmp_path, f"run.dir={tmp_path / 'afile' / 'myrun'}")
    assert "run.dir=" in line and "is a file" in line


# -- W&B -----------------------------------------------------------------------------------
@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path.parent / f"{tmp_path.name}.netrc"  # outside tmp_path: _fails checks it stays as is
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_wandb_online_without_a_key_says_set_it_or_use_offline(no_ray, no_wandb_key, capsys, tmp_path):
    line = _fails(capsys, tmp_path, "logging.wandb_mode=online")
    assert "logging.wandb_mode='online'" in line and "WANDB_API_KEY" in line and "wandb_mode=offline" in line
    no_wandb_key.write_text("machine example.org login user password abc\n")  # another host's entry
    assert "WANDB_API_KEY" in _fails(capsys, tmp_path, "logging.wandb_mode=online")


@pytest.mark.parametrize("source", ["env", "netrc", "netrc_custom_host"])
def test_wandb_online_with_a_key_passes_validation(no_wandb_key, monkeypatch, tmp_path, source):
    from tests.conftest import small_cfg

    if source == "env":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    elif source == "netrc":
        no_wandb_key.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    else:
        monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
        no_wandb_key.write_text("machine wandb.example.org login user password " + "k" * 40 + "\n")
    assert small_cfg(tmp_path, "logging.wandb_mode=online").logging.wandb_mode == "online"


# -- fault plan ----------------------------------------------------------------------------
@pytest.mark.parametrize("event,key,allowed", [
    ("{kind: network, bandwidth_gbps: -0.1}", "faults.events[0].bandwidth_gbps", ">= 0"),
    ("{kind: network, latency_s: -0.001}", "faults.events[0].latency_s", ">= 0"),
    ("{kind: network, step: -3, bandwidth_gbps: 1}", "faults.events[0].step", ">= 1"),
    ("{kind: straggler, step: -1}", "faults.events[0].step", ">= 1"),
    ("{kind: byzantine, rank: 0, step: 0, mode: zeros}", "faults.events[0].step", ">= 1"),
    ("{kind: byzantine, rank: 0, step: 5, until: 2, mode: zeros}", "faults.events[0].until", ">= the event"),
])
def test_negative_fault_settings_are_one_line_errors(no_ray, capsys, tmp_path, event, key, allowed):
    line = _fails(capsys, tmp_path, f"+faults.events=[{event}]")
    assert key in line and allowed in line, line


def test_fault_presets_still_validate(tmp_path):
    from tests.conftest import small_cfg

    for preset in ("byzantine", "network_100mbit", "stragglers_bursty", "crash", "hang"):
        assert small_cfg(tmp_path, f"faults={preset}").faults.events


# -- cluster.address -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_before_ray_init(no_ray, capsys, tmp_path):
    port = _free_port()
    line = _fails(capsys, tmp_path, f"cluster.address=127.0.0.1:{port}", "cluster.connect_timeout_s=5")
    assert f"cluster.address='127.0.0.1:{port}'" in line and "Connection refused" in line
    assert "ray start --head" in line and "RAY_AUTH_MODE" in line


def _cli(tmp_path, *overrides, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raylane.train", *SMALL, f"run.root={tmp_path / 'runs'}",
                           *overrides], capture_output=True, text=True, timeout=60, env=env)
    return proc, time.monotonic() - t0


def test_unreachable_ray_address_env_exits_2_in_seconds(tmp_path):
    port = _free_port()
    proc, took = _cli(tmp_path, "cluster.connect_timeout_s=5", env_extra={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert proc.returncode == 2 and proc.stdout == ""
    line, = proc.stderr.strip().splitlines()
    assert f"RAY_ADDRESS='127.0.0.1:{port}'" in line and "ray start --head" in line
    assert took < 30 and not (tmp_path / "runs").exists()


def test_address_that_accepts_but_is_no_ray_cluster_is_bounded_by_connect_timeout(tmp_path):
    with socket.socket() as silent:
        silent.bind(("0.0.0.0", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        proc, took = _cli(tmp_path, f"cluster.address=127.0.0.1:{port}", "cluster.connect_timeout_s=3")
    assert proc.returncode == 2 and proc.stdout == ""
    line, = proc.stderr.strip().splitlines()
    assert "no Ray cluster answered within cluster.connect_timeout_s=3" in line and "ray start --head" in line
    assert 3 <= took < 30 and not (tmp_path / "runs").exists()


def test_connect_timeout_must_be_positive(no_ray, capsys, tmp_path):
    line = _fails(capsys, tmp_path, "cluster.connect_timeout_s=0")
    assert "cluster.connect_timeout_s=0" in line and "> 0" in line
