"""Faults through the daemon process itself: SIGTERM with messages still queued in the sockets,
and an actor killed with SIGKILL mid-run.

- SIGTERM, 20 trials: every message the daemon took in ends as a result or a counted rejection
  (received == results + rejections), the daemon exits 0, and no `*.tmp` file is left.
- `kill -9` of an actor while a run streams in, 5 trials on one daemon: the run's `missing`
  equals the number of seqs the producer sent that got no result.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from harness import SMALL_SHAPE, Daemon, Results, free_port, producer, ray_cluster, small_config

pytestmark = pytest.mark.slow
SHAPE_ARG = ",".join(map(str, SMALL_SHAPE))
SIGTERM_TRIALS = 20
KILL_TRIALS = 5


@pytest.fixture(scope="module")
def cluster():
    """One Ray node for all SIGTERM trials: each trial's daemon joins it (a start of seconds)."""
    with ray_cluster(nodes=1, cpus_per_node=1) as address:
        yield address


def one_actor_config(tmp: Path, in_port: int, res_port: int, met_port: int, address: str) -> dict:
    """One CPU actor on the shared cluster; small receive queues still hold a few batches."""
    cfg = small_config(tmp, in_port, res_port, met_port, ray={"address": address, "num_cpus": 0})
    cfg["gpus"]["cpu_actors"] = 1
    cfg["ingest"]["sockets"][0]["rcvhwm"] = 32
    cfg["shutdown"] = {"timeout_s": 30, "drain_s": 5}
    return cfg


@pytest.mark.parametrize("trial", range(SIGTERM_TRIALS))
def test_sigterm_with_queued_messages_ends_every_message_in_a_result_or_rejection(cluster, tmp_path, trial):
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    results = Results(res_port)
    daemon = Daemon(one_actor_config(tmp_path, in_port, res_port, met_port, cluster), tmp_path)
    p = None
    try:
        daemon.wait_ready()
        # A burst far faster than the CPU finder (pooled frames: no simulation per frame), so
        # messages wait in the sockets' queues when the SIGTERM comes.
        p = producer("random", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", "300",
                     "--rate", "0", "--source", "t", "--run", str(trial), "--seed", str(trial),
                     "--shape", SHAPE_ARG, "--dtype", "uint16")
        at_term = len(results.wait_count(10 + 2 * trial, timeout=60))
        rc = daemon.terminate(timeout=60)
    finally:
        daemon.kill()
        if p is not None:
            p.kill()
            p.wait()
    assert rc == 0, daemon.tail()
    stopped = daemon.wait_event("daemon_stopped")
    got = results.wait_count(stopped["frames_processed"], timeout=10)
    results.close()
    rejected = sum(stopped["frames_rejected"].values())
    assert stopped["frames_received"] == len(got) + rejected, (stopped, len(got))
    assert stopped["frames_processed"] == len(got) == len({r["seq"] for r in got})
    assert len(got) > at_term  # frames queued at SIGTERM were still processed
    assert not list((tmp_path / "cxi").glob("*.tmp")) and not list((tmp_path / "cxi").glob("*.partial"))


def latest_actor_pid(daemon: Daemon, index: int) -> int:
    events = [e for e in daemon.events if e.get("event") in ("actor_ready", "actor_restarted", "actor_back")
              and e.get("actor", e.get("index")) == index]
    return events[-1]["pid"]


def test_killed_actor_mid_run_missing_equals_seqs_without_result(tmp_path):
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    results = Results(res_port)
    daemon = Daemon(small_config(tmp_path, in_port, res_port, met_port), tmp_path)
    try:
        daemon.wait_ready()
        for trial in range(KILL_TRIALS):
            run = 100 + trial
            victim_index = trial % 2
            victim = latest_actor_pid(daemon, victim_index)
            restarts_before = len(daemon.find("actor_restarted"))
            p = producer("bragg", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", "600",
                         "--rate", "300", "--source", "k", "--run", str(run), "--seed", str(trial),
                         "--shape", SHAPE_ARG, "--timeout", "60")
            results.wait_count(100, timeout=60, where=lambda r, run=run: r["run"] == run)
            os.kill(victim, signal.SIGKILL)
            daemon.wait_event("actor_restarted", timeout=60,
                              where=lambda e, n=restarts_before: len(daemon.find("actor_restarted")) > n)
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outcome = daemon.wait_event("run_complete", timeout=60,
                                        where=lambda e, run=run: e["source"] == "k" and e["run"] == run)
            got = {r["seq"] for r in results.wait_count(outcome["processed"], timeout=10,
                                                         where=lambda r, run=run: r["run"] == run)}
            assert outcome["count"] == 600
            assert outcome["missing"] == 600 - len(got), (trial, outcome, len(got))
            assert outcome["processed"] == len(got)
        assert not daemon.find("results_sender_count_missing")  # each dead sender's count was read
        assert daemon.terminate(timeout=60) == 0, daemon.tail()
    finally:
        daemon.kill()
        results.close()
