"""Connecting to an existing Ray cluster within `cluster.connect_timeout_s`, or saying why not.

`ray.init(address=...)` retries an unreachable GCS forever. `attach(address, key, timeout_s)`
bounds it in two stages, both ending in one line on stderr and exit code 2:
1. the GCS address Ray would use (`auto` found, localhost made the node's IP) must accept a
   TCP connection within the timeout: otherwise a `ConfigError` naming what to check;
2. `ray.init` must return within the rest of the timeout (a port that accepts but is no
   Ray GCS). A Python thread cannot interrupt ray.init, so a watchdog thread prints the
   message and ends the process with `os._exit(2)`; nothing has been started or written then.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from raylane.validation import ConfigError

EXIT_USER_ERROR = 2


def advice(port: int | str) -> str:
    return (f"check that `ray start --head` runs at that address (GCS port {port}) and is reachable from "
            "this machine, and that RAY_AUTH_MODE / RAY_AUTH_TOKEN (or ~/.ray/auth_token) match the head's; "
            "raise cluster.connect_timeout_s for a slow network")


def gcs_endpoint(address: str, key: str) -> tuple[str, int] | None:
    """(host, port) that ray.init will dial for `address`; None for `local` (Ray starts one)."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    if address.startswith("ray://"):  # Ray client: its server, as given
        target = address[len("ray://"):].rstrip("/")
    elif address == "local":
        return None
    else:
        try:
            target = canonicalize_bootstrap_address_or_die(address)
        except (ConnectionError, ValueError, OSError) as e:
            raise ConfigError(f"{key}={address!r}: {str(e).splitlines()[0]}; {advice('6379')}") from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{key}={address!r}: not an address; use host:port (e.g. 10.0.0.1:6379), auto, "
                          "or ray://host:10001")
    return host.strip("[]"), int(port)


def check_reachable(address: str, key: str, timeout_s: float) -> None:
    """ConfigError unless the GCS behind `address` accepts a TCP connection within timeout_s."""
    endpoint = gcs_endpoint(address, key)
    if endpoint is None:
        return
    host, port = endpoint
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ConfigError(f"{key}={address!r}: no Ray cluster answers at {host}:{port} ({reason}, "
                          f"cluster.connect_timeout_s={timeout_s:g}); {advice(port)}") from None


def bounded(fn: Callable[[], Any], timeout_s: float, message: str) -> Any:
    """fn(), or — when it has not returned after timeout_s — `message` on stderr and exit code 2."""
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(timeout_s):
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(EXIT_USER_ERROR)

    threading.Thread(target=watchdog, name="ray-connect-watchdog", daemon=True).start()
    try:
        return fn()
    finally:
        done.set()


def attach(address: str, key: str, timeout_s: float) -> None:
    """ray.init(address) within timeout_s, else a one-line error and exit code 2."""
    import ray

    t0 = time.monotonic()
    check_reachable(address, key, timeout_s)
    left = max(1.0, timeout_s - (time.monotonic() - t0))
    message = (f"{key}={address!r}: the address accepts connections but no Ray cluster answered within "
               f"cluster.connect_timeout_s={timeout_s:g}; {advice(address.rpartition(':')[2])}")
    bounded(lambda: ray.init(address=address, logging_level=logging.WARNING), left, message)
