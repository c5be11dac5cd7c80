"""Joining a Ray cluster: two nodes started on this machine (`ray start --head` and a second
`ray start --address`), the daemon joins by address, checks each node's health and places one
actor on each; the 300-frame check holds."""

from __future__ import annotations

from collections import Counter

import pytest

from harness import SMALL_SHAPE, Daemon, Results, free_port, producer, ray_cluster, small_config

pytestmark = pytest.mark.slow
@pytest.fixture
def two_node_cluster():
    with ray_cluster(nodes=2) as address:
        yield address


def test_daemon_joins_a_two_node_cluster_and_uses_both(two_node_cluster, tmp_path):
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    results = Results(res_port)
    cfg = small_config(tmp_path, in_port, res_port, met_port, ray={"address": two_node_cluster, "num_cpus": 0})
    daemon = Daemon(cfg, tmp_path)
    try:
        daemon.wait_ready(timeout=240)
        health = daemon.find("node_health")
        assert len({e["node"] for e in health}) == 2
        nodes = {e["node"] for e in daemon.find("actor_ready")}
        assert len(nodes) == 2, daemon.find("actor_ready")
        p = producer("bragg", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", "300",
                     "--rate", "0", "--source", "c0", "--run", "7", "--seed", "7",
                     "--shape", ",".join(map(str, SMALL_SHAPE)))
        got = results.wait_count(300, timeout=180)
        assert p.wait(timeout=60) == 0
        keys = Counter((r["source"], r["seq"]) for r in got)
        assert len(got) == 300 and max(keys.values()) == 1
        assert len({r["worker"] for r in got}) == 2  # both actors took frames
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()
        results.close()
