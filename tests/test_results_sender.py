"""The results sender process: what a killed GPU process handed over is sent and counted exactly.

A `kill -9` of the process that writes results must not lose one it already counted. Here a
subprocess stands for the GPU process: it hands results to a `ResultSender` as fast as it can,
the consumer stops reading for a moment (the queues fill), and the writer is killed. Its sender
process (now an orphan) sends what the pipe and its socket held, writes its final count, and
the consumer receives exactly that many results, seq for seq.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from harness import free_port
from peaknet_daemon.config import config_from_dict
from peaknet_daemon.sinks import ResultSender
from peaknet_daemon.wire import decode_result

pytestmark = pytest.mark.timeout(120)

WRITER = textwrap.dedent("""
    import sys
    from peaknet_daemon.config import config_from_dict
    from peaknet_daemon.sinks import ResultSender
    endpoint, tally = sys.argv[1], sys.argv[2]
    cfg = config_from_dict({"output": {"results_endpoint": endpoint, "results_sndhwm": 64}})
    sender = ResultSender(cfg, 0, tally)
    print("PID", sender.process.pid, flush=True)
    peaks = {"panel": [0], "y": [1.0], "x": [2.0], "intensity": [3.0], "npix": [2]}
    for seq in range(10**9):
        sender.put({"source": "k", "seq": seq, "run": 5, "timestamp_ns": seq, "n_peaks": 1, "hit": seq % 2 == 0,
                    "peaks": peaks, "latency_ms": 0.1, "worker": "w", "overflow": False, "meta": {}})
""")


class Consumer:
    """A PULL socket that binds, as a results consumer does."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.seqs: list[int] = []

    def take(self, n: int, timeout: float) -> list[int]:
        """Receive until `n` results arrived or nothing came for `timeout` s."""
        while len(self.seqs) < n and self.sock.poll(int(timeout * 1e3)):
            self.seqs.append(decode_result(self.sock.recv())["seq"])
        return self.seqs

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def wait_for_file(path: Path, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return path.read_bytes()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


@pytest.mark.parametrize("trial", range(3))
def test_a_killed_writer_loses_no_result_its_sender_counted(tmp_path, trial):
    consumer = Consumer()
    tally = tmp_path / "actor-0-x.sent.msgpack"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, consumer.endpoint, str(tally)],
                              stdout=subprocess.PIPE, text=True)
    try:
        sender_pid = int(next(line for line in writer.stdout if line.startswith("PID ")).split()[1])
        consumer.take(200 + 300 * trial, timeout=30)  # results are flowing
        time.sleep(0.5)  # the consumer is away: the sender's socket and pipe fill up
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
        reading = threading.Thread(target=consumer.take, args=(10**9, 3.0))  # back, until 3 s of quiet
        reading.start()
        final = msgpack.unpackb(wait_for_file(tally, 30), raw=False)
        reading.join()
        got = consumer.seqs
    finally:
        writer.kill()
        consumer.close()
    assert final["final"] and final["processed"] >= 200 + 300 * trial
    assert len(got) == final["processed"] and sorted(got) == list(range(len(got)))
    assert final["runs"] == [["k", 5, len(got), 0, len(got) - 1]]
    assert final["hits"] == (len(got) + 1) // 2 and final["results_dropped"] == {}
    with pytest.raises(ProcessLookupError):  # the orphaned sender finished
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.kill(sender_pid, 0)
            if Path(f"/proc/{sender_pid}/status").read_text().count("zombie"):
                raise ProcessLookupError
            time.sleep(0.05)


def test_a_dead_sender_is_started_again_and_results_go_on():
    consumer = Consumer()
    cfg = config_from_dict({"output": {"results_endpoint": consumer.endpoint}})
    sender = ResultSender(cfg, 0)
    peaks = {"panel": [], "y": [], "x": [], "intensity": [], "npix": []}

    def result(seq: int) -> dict:
        return {"source": "k", "seq": seq, "run": 1, "timestamp_ns": 0, "n_peaks": 0, "hit": False,
                "peaks": peaks, "latency_ms": 0.1, "worker": "w", "overflow": False, "meta": {}}
    try:
        sender.put(result(0))
        assert consumer.take(1, timeout=10) == [0]
        first = sender.process.pid
        os.kill(first, signal.SIGKILL)
        sender.process.join(10)
        for seq in range(1, 4):
            sender.put(result(seq))
        assert consumer.take(4, timeout=10) == [0, 1, 2, 3]
        assert sender.restarts == 1 and sender.process.pid != first
        assert sender.close(5.0)
    finally:
        sender.close(0.0)
        consumer.close()


def test_in_bind_mode_a_new_sender_waits_for_the_port_its_predecessor_still_holds():
    """An actor restarted in bind mode: the dead incarnation's sender may still linger on the
    port; the new one retries the bind instead of failing the actor's start."""
    port = free_port()
    cfg = config_from_dict({"output": {"results_endpoint": f"tcp://127.0.0.1:{port}", "results_bind": True}})
    first = ResultSender(cfg, 0)
    started: list[ResultSender] = []
    second = threading.Thread(target=lambda: started.append(ResultSender(cfg, 0)))
    second.start()
    try:
        second.join(1.5)  # time to start and to find the port taken (a start takes ~0.5 s here)
        assert not started  # it cannot be up while the port is held
        assert first.close(5.0)
        second.join(30)
        assert started and started[0].endpoint == f"tcp://127.0.0.1:{port}"
    finally:
        first.close(0.0)
        second.join(30)
        for sender in started:
            sender.close(0.0)


def test_the_supervisor_takes_a_dead_actors_count_from_its_sender_and_does_not_wait_for_a_dead_one(tmp_path):
    from peaknet_daemon.supervisor import read_tally
    from peaknet_daemon.worker import sent_path, tally_path

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = {"processed": 3, "in_flight": 2, "runs": [["k", 1, 3, 0, 2]], "results_sender": gone.pid}
    tally_path(str(tmp_path), 0, "a").write_bytes(msgpack.packb(worker))
    t0 = time.monotonic()
    assert read_tally(str(tmp_path), 0, "a", wait_s=30) == worker  # its sender is gone: no count to wait for
    assert time.monotonic() - t0 < 5
    sent = {"final": True, "processed": 5, "peaks": 9, "hits": 1, "runs": [["k", 1, 5, 0, 4]], "results_dropped": {}}
    sent_path(str(tmp_path), 0, "a").write_bytes(msgpack.packb(sent))
    merged = read_tally(str(tmp_path), 0, "a")
    assert (merged["processed"], merged["in_flight"], merged["runs"]) == (5, 0, [["k", 1, 5, 0, 4]])
