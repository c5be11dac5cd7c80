"""Joining a Ray cluster: two nodes started on this machine (`ray start --head` and a second
`ray start --address`), the daemon joins by address, checks each node's health and places one
actor on each; the 300-frame check holds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from harness import SMALL_SHAPE, Daemon, Results, free_port, producer, small_config

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def ray_cli(*args: str, tmp: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([RAY, *args], check=True, env=env, stdout=subprocess.DEVNULL, timeout=180)


@pytest.fixture
def two_node_cluster(tmp_path):
    if not Path(RAY).exists():
        pytest.fail("the ray CLI is missing from this environment")
    port = free_port()
    temp = Path("/tmp") / f"ray-pn-{port}"  # unix socket paths must stay short
    ray_cli("start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
            f"--temp-dir={temp}", "--disable-usage-stats", tmp=tmp_path)
    try:
        ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--num-gpus=0",
                "--disable-usage-stats", tmp=tmp_path)
        yield f"127.0.0.1:{port}"
    finally:
        ray_cli("stop", "--force", tmp=tmp_path)
        shutil.rmtree(temp, ignore_errors=True)


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
