"""One pipeline worker in-process, without Ray: frames pushed over ZeroMQ (ipc) into its bound
ingest socket, results read from the results stream, CXI files on disk. Every received frame
ends in a result or a counted rejection: with a full disk, and while `stop()` runs."""

from __future__ import annotations

import errno
import io
import json
import logging
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from harness import Results, free_port
from peaknet_daemon.config import LoggingConfig, config_from_dict
from peaknet_daemon.log import configure_logging
from peaknet_daemon.pipeline import run_sequential
from peaknet_daemon.wire import encode_frame
from peaknet_daemon.worker import Worker
from peaknet_producers.bragg import BraggConfig, BraggSimulator

SHAPE = (2, 64, 64)
N = 24


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    sim = BraggSimulator(BraggConfig(shape=SHAPE, dtype="uint16"), seed=11)
    return [sim.simulate(i).data for i in range(N)]


@pytest.fixture
def results():
    port = free_port()
    res = Results(port)
    res.endpoint = f"tcp://127.0.0.1:{port}"
    yield res
    res.close()


@pytest.fixture
def log_lines():
    """The worker's structured log as parsed JSON lines (the root logger is restored after)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    root.handlers[:] = handlers
    root.setLevel(level)


def worker_config(tmp_path: Path, results_endpoint: str):
    return config_from_dict({
        "model": {"preset": "classical", "classical": {"snr_threshold": 6.0, "min_pixels": 2}},
        "pipeline": {"frame_shape": list(SHAPE), "dtype": "uint16", "batch_size": 4,
                     "max_batch_delay_ms": 10, "buffers": 2, "device": "cpu"},
        "ingest": {"reject_log_interval_s": 60,
                   "sockets": [{"endpoint": f"ipc://{tmp_path}/in.ipc", "mode": "bind"}]},
        "output": {"results_endpoint": results_endpoint, "results_bind": False,
                   "cxi_dir": str(tmp_path / "cxi"), "save_frames": "all", "hit_threshold": 1},
    }, "<test_worker>")


class Pusher:
    """A producer's PUSH socket connected to the worker's ingest endpoint."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames, first_seq: int = 0, run: int = 1, source: str = "det") -> None:
        for i, frame in enumerate(frames):
            self.sock.send_multipart(encode_frame(frame, source, first_seq + i, run=run))

    def close(self, linger_ms: int = 0) -> None:
        """Close; with `linger_ms`, first wait (that long at most) until every message sent has
        left for the worker."""
        if self.ctx.closed:
            return
        self.sock.close(linger=linger_ms)
        self.ctx.term()


def wait_stats(worker: Worker, done, timeout: float = 30) -> dict:
    """The worker's stats once `done(stats)` holds."""
    deadline = time.monotonic() + timeout
    while not done(stats := worker.stats()):
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)  # polling counters that have no event to wait on
    return stats


def wait_processed(worker: Worker, n: int, timeout: float = 30) -> dict:
    """The worker's stats once it has processed (streamed and handed to the CXI writer) `n` frames."""
    return wait_stats(worker, lambda s: s["processed"] >= n, timeout)


def cxi_events(cxi_dir: Path) -> dict[int, int]:
    """seq -> nPeaks over the completed CXI files."""
    events = {}
    for path in sorted(cxi_dir.glob("*.cxi")):
        with h5py.File(path, "r") as f:
            assert f["/entry_1/data_1/data"].shape[0] == len(f["/entry_1/seq"])
            events.update(zip(f["/entry_1/seq"][:].tolist(), f["/entry_1/result_1/nPeaks"][:].tolist()))
    return events


def send_all_and_stop(worker: Worker, pusher: Pusher, frames, results) -> tuple[list[dict], dict]:
    """Push every frame, wait for its N results, stop the worker: (results, final stats)."""
    try:
        pusher.send(frames)
        got = results.wait_count(N, timeout=60)
        return got, worker.stop()
    finally:
        pusher.close()


def test_every_frame_gives_a_result_and_a_cxi_event(tmp_path, frames, results):
    cfg = worker_config(tmp_path, results.endpoint)
    worker = Worker(cfg)
    pusher = Pusher(worker.endpoints[0])
    got, final = send_all_and_stop(worker, pusher, frames, results)

    assert len(got) == N
    assert sorted(r["seq"] for r in got) == list(range(N))
    assert final["received"] == final["processed"] == N
    assert final["rejected"] == {} and final["sink_errors"] == {}
    assert all(r["truncated"] == 0 for r in got) and final["peaks_truncated"] == 0  # marked, none cut

    expected = run_sequential(cfg, frames)
    by_seq = {r["seq"]: r for r in got}
    assert [by_seq[i]["n_peaks"] for i in range(N)] == [p.n_peaks for p in expected]
    assert sum(p.n_peaks for p in expected) > N  # simulated hits do have peaks
    np.testing.assert_array_equal(by_seq[0]["peaks"]["x"], expected[0].x)

    cxi = tmp_path / "cxi"
    assert cxi_events(cxi) == {i: by_seq[i]["n_peaks"] for i in range(N)}
    assert not list(cxi.glob("*.tmp")) and not list(cxi.glob("*.partial"))
    assert (cxi / "peaknet-slab.geom").resolve() == (cxi / "peaknet-slab-2x64x64.geom")
    (path,) = cxi.glob("*.cxi")
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/entry_1/data_1/data"][3], frames[3].reshape(-1, SHAPE[2]))


def test_disk_full_loses_cxi_events_but_no_results(tmp_path, frames, results, log_lines, monkeypatch):
    """ENOSPC from HDF5 is counted and logged; the results stream carries on, the worker stays
    up, and CXI writing resumes in a fresh file once there is space again."""
    worker = Worker(worker_config(tmp_path, results.endpoint))
    pusher = Pusher(worker.endpoints[0])
    attempts = []

    def disk_full(self, key, value):
        attempts.append(key)
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
        pusher.send(frames[:12])
        assert len(results.wait_count(12, timeout=60)) == 12
        # CXI writes follow on the writer's own thread: wait until all 12 have been tried
        during = wait_stats(worker, lambda s: s["processed"] >= 12 and s["sink_errors"].get("cxi", 0) >= 12)
        monkeypatch.undo()  # space is back

        pusher.send(frames[12:], first_seq=12)
        got = results.wait_count(N, timeout=60)
        final = worker.stop()
    finally:
        monkeypatch.undo()
        pusher.close()

    assert sorted(r["seq"] for r in got) == list(range(N))
    assert attempts and during["sink_errors"]["cxi"] == 12
    assert during["processed"] == 12
    assert final["received"] == final["processed"] == N and final["rejected"] == {}
    assert final["sink_errors"] == {"cxi": 12}

    cxi = tmp_path / "cxi"
    assert sorted(cxi_events(cxi)) == list(range(12, N))  # the frames after the disk had space
    assert not list(cxi.glob("*.tmp"))
    assert list(cxi.glob("*.partial"))  # what the failed files held, out of CrystFEL's way

    errors = [e for e in log_lines() if e["event"] == "sink_error"]
    assert errors and errors[0]["sink"] == "cxi" and errors[0]["level"] == "error"
    assert "No space left on device" in errors[0]["error"]
    assert any(e["event"] == "worker_stopped" and e["processed"] == N for e in log_lines())


def test_stop_returns_cleanly_while_the_disk_is_still_full(tmp_path, frames, results, monkeypatch):
    worker = Worker(worker_config(tmp_path, results.endpoint))
    pusher = Pusher(worker.endpoints[0])

    def disk_full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    got, final = send_all_and_stop(worker, pusher, frames, results)

    assert sorted(r["seq"] for r in got) == list(range(N))
    assert final["received"] == final["processed"] == N and final["rejected"] == {}
    assert final["sink_errors"] == {"cxi": N}
    cxi = tmp_path / "cxi"
    assert not list(cxi.glob("*.cxi")) and not list(cxi.glob("*.tmp"))


def test_frames_arriving_during_stop_are_processed_or_counted(tmp_path, frames, results):
    worker = Worker(worker_config(tmp_path, results.endpoint))
    pusher = Pusher(worker.endpoints[0])
    done = threading.Event()
    sent = []

    def keep_sending():
        seq = 0
        while not done.is_set():
            if pusher.sock.poll(20, zmq.POLLOUT):  # wait for room, re-checking `done`
                pusher.sock.send_multipart(encode_frame(frames[seq % N], "det", seq, run=1), zmq.NOBLOCK)
                sent.append(seq)
                seq += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        assert len(results.wait_count(2 * N, timeout=60)) >= 2 * N  # frames are flowing
        final = worker.stop()
    finally:
        done.set()
        sender.join()
        pusher.close()

    rejected = sum(final["rejected"].values())
    assert final["received"] == final["processed"] + rejected
    assert set(final["rejected"]) <= {"shutdown"}
    assert final["processed"] >= 2 * N and final["received"] <= len(sent)
    got = results.wait_count(final["processed"], timeout=30)
    assert len(got) == final["processed"]  # every processed frame's result was delivered
    seqs = [r["seq"] for r in got]
    assert len(set(seqs)) == len(seqs)
    assert sorted(cxi_events(tmp_path / "cxi")) == sorted(seqs)
    assert not list((tmp_path / "cxi").glob("*.tmp"))
