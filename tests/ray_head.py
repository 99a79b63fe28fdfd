"""A throwaway Ray head for tests: `ray start --head --block` on loopback, its own temp dir and ports.

Token auth as the README tells users: RAY_AUTH_MODE=token for the head and for every CLI
call, with the token in a file of the head's own (RAY_AUTH_TOKEN_PATH), so no state in
~/.ray is read or written. Stopping kills the head's process group and any process left
that names its temp dir: other Ray clusters on the machine are untouched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from raylane.comm.process_group import free_port

BIN = Path(sys.executable).parent


def ray_env(tmp: Path) -> dict[str, str]:
    token = tmp / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0", WANDB_SILENT="true")
    return env


def _kill_leftovers(marker: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@contextlib.contextmanager
def local_head(tmp: Path, num_cpus: int = 2, timeout_s: float = 90):
    """Yields (dashboard_url, env) for a head that is up; always stops it."""
    tmp.mkdir(parents=True, exist_ok=True)
    temp_dir = Path("/tmp") / f"rl-head-{secrets.token_hex(4)}"  # short: Ray's socket paths are length-limited
    env = ray_env(tmp)
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    log = open(tmp / "head.log", "w")
    # On SIGTERM a head first drains for up to 30 s (for Serve replicas; ray 2.60), which outlasts the 20 s
    # wait below: a throwaway head has nothing to drain, so it stops at once (~3 s instead of 20 s).
    head = subprocess.Popen(cmd, env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + timeout_s
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up:\n{(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        _kill_leftovers(str(temp_dir))
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
