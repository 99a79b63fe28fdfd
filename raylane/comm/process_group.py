"""Process groups that survive their members.

One TCPStore per run, hosted by the coordinator (`host_store`), never by a worker, so
any worker may die; it listens only on the address it is given. Each generation of
members builds its group under a fresh prefix (`gen{n}`) of that store, inside the
processes that already exist (`connect`): a group can be re-formed without restarting anyone.
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist

from raylane.comm.communicator import Communicator, Link


def host_store(host: str, timeout_s: float = 300.0) -> dist.TCPStore:
    """Start the run's TCPStore server in this process on a free port (`store.port`).

    The server listens on `host` only (127.0.0.1 for a one-machine run): the store has no
    authentication, and TCPStore binds every interface unless it is handed a listening socket
    (`master_listen_fd`), so it gets one bound here. The store owns (and closes) that socket.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.listen(1024)
        store = dist.TCPStore(host, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server closes the descriptor when it stops
    return store


def connect(store_host: str, store_port: int, generation: int, rank: int, world_size: int,
            backend: str = "gloo", timeout_s: float = 60.0, link: Link | None = None,
            bind_host: str | None = None, name: str | None = None) -> Communicator:
    """Join generation `generation` of the run's group as `rank` of `world_size`.

    `timeout_s` bounds every collective: a peer that hangs is caught by it. `bind_host`
    is the address this process's Gloo transport listens on (default: the store host,
    which keeps a one-machine run on loopback). `name` joins a named subgroup instead of the
    world group: its members use the store prefix `gen<generation>/<name>` and their own ranks.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"gen{generation}" + (f"/{name}" if name else ""), store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host or store_host)]
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"backend={backend!r}: choose one of ['gloo', 'nccl']")
    comm = Communicator(pg, rank, world_size, backend, link)
    comm.store = store  # keep the client alive as long as the group
    return comm


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
