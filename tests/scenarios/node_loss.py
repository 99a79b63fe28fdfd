"""Node loss on a multi-node Ray cluster on one machine (ray.cluster_utils.Cluster).

Run as its own process (one Ray per process): `python -m tests.scenarios.node_loss OUT_DIR`.
Two worker nodes with 1 CPU each hold 2 workers each; at step 5 the node of worker 0 is
removed (both its workers die at once) and a new node joins, so the replacements fit.
Prints one JSON line: steps, samples, whether parameters equal a fault-free run's, events.
"""

import json
import os
import secrets
import sys
from pathlib import Path

import ray
import ray._private.services
import torch
from ray.cluster_utils import Cluster

from raylane.orchestrator.coordinator import Coordinator
from tests.conftest import small_cfg

COMMON = ["train.steps=10", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5",
          "cluster.collective_timeout_s=5", "cluster.replace_timeout_s=60"]


def train(cfg, hook=None):
    coord = Coordinator(cfg, fault_hook=hook)
    try:
        coord.train()
        nodes = {a["node_id"] for a in coord.group.addresses}
        return coord.step, coord.samples, coord.group.get(coord.group.call("flat_parameters"))[0], nodes
    finally:
        coord.close()


def main(out: Path) -> None:
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # This cluster listens on loopback only; Ray would rewrite 127.0.0.1 to the machine's
    # outward address when connecting to it.
    ray._private.services.resolve_ip_for_localhost = lambda host: host
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    workers = {cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)}
    ray.init(address=cluster.address)
    try:
        ff = train(small_cfg(out, *COMMON, "run.name=fault-free"))

        def lose_node(event, ranks, node_id):
            node = next(n for n in workers if n.node_id == node_id)
            cluster.remove_node(node)
            workers.discard(node)
            workers.add(cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1"))

        cfg = small_cfg(out, *COMMON, "run.name=node-loss", "+faults.events=[{kind: node_loss, rank: 0, step: 5}]")
        got = train(cfg, lose_node)
        events = [json.loads(x) for x in (cfg.run.path() / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({"steps": [ff[0], got[0]], "samples": [ff[1], got[1]],
                          "identical": bool(torch.equal(ff[2], got[2])),
                          "max_abs_diff": float((ff[2] - got[2]).abs().max()),
                          "events": [e for e in events if "event" in e]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
