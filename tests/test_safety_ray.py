"""On the session Ray cluster (embedded, loopback): what raylane starts listens on loopback only;
DiLoCo and gradient-coding checkpoints hold only what torch's weights-only loader accepts; a resume
whose strategy cannot load the checkpoint fails without rewriting config.yaml."""

import ipaddress
import os
from pathlib import Path

import pytest
import ray
import torch
import yaml

from raylane.orchestrator.coordinator import Coordinator
from raylane.orchestrator.worker_group import WorkerGroup
from tests.conftest import small_cfg

pytestmark = [pytest.mark.timeout(120), pytest.mark.ray]


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                hex_ip, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_ip)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc: host-order words
                found.add((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_an_embedded_runs_store_and_process_groups_listen_on_loopback_only(ray_cluster, tmp_path):
    """Ray's own servers are not raylane's: the test compares each process's listeners before and after
    raylane opened its own (the driver's TCPStore, each worker's Gloo transport)."""
    cfg = small_cfg(tmp_path, "cluster.num_workers=2")
    driver_before = listening(os.getpid())
    group = WorkerGroup(cfg, loopback=True)
    try:
        store = set(listening(os.getpid()) - driver_before)
        assert store and {port for _, port in store} == {group.store.port}
        group.actors = [group.new_actor(r) for r in range(2)]
        group.addresses = ray.get([a.address.remote() for a in group.actors], timeout=60)
        pids = [a["pid"] for a in group.addresses]
        workers_before = {pid: listening(pid) for pid in pids}
        group.form_group()
        group.begin_step(1, {})
        group.get(group.call("train_step", 0, 1e-3))
        opened = store | {s for pid in pids for s in listening(pid) - workers_before[pid]}
        assert len(opened) >= 1 + len(pids), f"expected the store and a Gloo listener per worker: {opened}"
        assert all(_loopback(address) for address, _ in opened), opened
    finally:
        group.shutdown()


@pytest.mark.parametrize("strategy", [
    ["strategy=streaming_diloco", "model.n_layer=2", "strategy.sync_every=4", "strategy.overlap_steps=3",
     "cluster.num_workers=2"],
    ["strategy=m_sgc", "strategy.window=3", "strategy.streams=3", "cluster.num_workers=4",
     "strategy.stragglers={model: bursty, delay_s: 0.25, p_on: 0.25, p_off: 0.5}"],
], ids=["streaming_diloco", "m_sgc"])
def test_every_part_of_a_checkpoint_with_work_in_flight_loads_weights_only(ray_cluster, tmp_path, strategy):
    coord = Coordinator(small_cfg(tmp_path, "train.steps=10", "optim.warmup_steps=2", *strategy))
    try:
        coord.train(until_step=5)
        path = coord.save_checkpoint()
    finally:
        coord.close()
    parts = sorted(p.name for p in path.glob("*.pt"))
    assert "driver.pt" in parts and any(p.startswith("local_") for p in parts)
    loaded = {name: torch.load(path / name, map_location="cpu", weights_only=True) for name in parts}
    driver = loaded["driver.pt"]["strategy"]
    if "results" in driver:
        assert driver["jobs"], "the m_sgc checkpoint should hold jobs in flight"
    else:
        replica = next(v for k, v in loaded.items() if k.startswith("replica"))
        assert replica["strategy"]["outer"]["in_flight"], "the diloco checkpoint should hold a sync in flight"


def test_a_resume_the_strategy_cannot_load_fails_and_leaves_config_yaml_alone(ray_cluster, tmp_path):
    common = ["strategy=diloco", "model.n_layer=2", "strategy.sync_every=2", "train.steps=4",
              "cluster.num_workers=2", "run.name=frag"]
    coord = Coordinator(small_cfg(tmp_path, *common, "strategy.fragments=1", "checkpoint.every=2"))
    try:
        coord.train(until_step=2)
    finally:
        coord.close()
    config_yaml = tmp_path / "frag" / "config.yaml"
    saved = config_yaml.read_text()
    assert yaml.safe_load(saved)["strategy"]["fragments"] == 1

    resumed = small_cfg(tmp_path, *common, "strategy.fragments=2", "resume=true")
    with pytest.raises(ValueError, match="differ from this run's"):
        Coordinator(resumed)
    assert config_yaml.read_text() == saved
