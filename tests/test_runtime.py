"""The actor runtime under faults, in-process without Ray: a fault injected into each worker role
(ingest process, dispatch, launch, results, CXI writer) ends in a counted failure, recovery or an
unhealthy worker, and exact accounting: every message taken off a socket is a result or a
counted rejection. Stop drains the sockets' queues and is bounded even when the results consumer
stops reading."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from harness import Results, free_port
from peaknet_daemon.config import config_from_dict, to_dict as config_to_dict
from peaknet_daemon.worker import Worker
from test_worker import N, Pusher, cxi_events, frames, results, wait_stats  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)


def runtime_config(tmp_path: Path, results_endpoint: str, dtype: str = "uint16", **sections):
    cfg = {
        "model": {"preset": "classical", "classical": {"snr_threshold": 6.0, "min_pixels": 2}},
        "pipeline": {"frame_shape": [2, 64, 64], "dtype": dtype, "batch_size": 4,
                     "max_batch_delay_ms": 10, "buffers": 2, "device": "cpu"},
        "ingest": {"reject_log_interval_s": 60, "sockets": [{"endpoint": f"ipc://{tmp_path}/in.ipc", "mode": "bind"}]},
        "output": {"results_endpoint": results_endpoint, "results_bind": False,
                   "cxi_dir": str(tmp_path / "cxi"), "save_frames": "all", "hit_threshold": 1},
        "shutdown": {"timeout_s": 20, "drain_s": 5},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return config_from_dict(cfg, "<test_runtime>")


def balanced(s: dict) -> bool:
    """Every message taken off the sockets is a result or a counted rejection."""
    return s["received"] == s["processed"] + sum(s["rejected"].values()) and s["in_flight"] == 0


class FailOnce:
    """Wraps a callable: the first call raises `exc`, later calls go through."""

    def __init__(self, inner, exc: BaseException = RuntimeError("injected fault")):
        self.inner, self.exc, self.calls = inner, exc, 0
        for name in ("min_pixels", "max_pixels"):  # when it stands in for a finder
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise self.exc
        return self.inner(*args, **kwargs)


@pytest.fixture
def running(tmp_path, results):
    """running(**sections) -> (worker, pusher); both are stopped and closed afterwards."""
    made = []

    def start(dtype="uint16", **sections):
        worker = Worker(runtime_config(tmp_path, results.endpoint, dtype, **sections))
        pusher = Pusher(worker.endpoints[0])
        made.append((worker, pusher))
        return worker, pusher

    yield start
    for worker, pusher in made:
        worker.stop()
        pusher.close()


def test_nan_frames_are_found_on_the_device_and_counted(running, results, frames):
    worker, pusher = running(dtype="float32")
    good = [f.astype(np.float32) for f in frames[:10]]
    bad = good[0].copy()
    bad[1, 5, 5] = np.nan
    inf = good[1].copy()
    inf[0, 0, 0] = np.inf
    pusher.send(good[:5] + [bad, inf] + good[5:])
    got = results.wait_count(10)
    s = wait_stats(worker, lambda s: s["processed"] + s["rejected"].get("non_finite", 0) == 12)
    assert sorted(r["seq"] for r in got) == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert s["rejected"] == {"non_finite": 2} and balanced(s)
    assert worker.ring.in_flight[0] == 0  # the gauge the ingest processes read follows the device


class Held:
    """Wraps a callable: every call waits until `release` is set (the GPU side held up)."""

    def __init__(self, inner):
        self.inner, self.release = inner, threading.Event()

    def __call__(self, *args, **kwargs):
        assert self.release.wait(60), "never released"
        return self.inner(*args, **kwargs)


def test_time_without_a_free_slot_is_counted_while_the_gpu_side_is_held_up(running, results, frames, monkeypatch):
    worker, pusher = running()
    held = Held(worker.pipeline.submit)
    monkeypatch.setattr(worker.pipeline, "submit", held)
    pusher.send(frames)  # more than the 2 slots an ingest process holds (2 x batch 4)
    s = wait_stats(worker, lambda s: s["ingest_slot_wait_ms"] >= 200)
    assert s["processed"] == 0
    held.release.set()
    s = wait_stats(worker, lambda s: s["processed"] == N)
    assert s["ingest_slot_wait_ms"] >= 200 and balanced(s)


def test_a_dispatch_fault_is_counted_and_its_batch_ends_as_internal_error(running, results, frames, monkeypatch):
    worker, pusher = running()
    monkeypatch.setattr(worker.pipeline, "submit", FailOnce(worker.pipeline.submit))
    pusher.send(frames)
    s = wait_stats(worker, lambda s: s["processed"] + s["rejected"].get("internal_error", 0) == N)
    lost = s["rejected"]["internal_error"]
    assert 1 <= lost <= 4 and s["processed"] == N - lost and balanced(s)
    assert s["thread_failures"] == {"dispatch": 1}
    assert s["workers"]["dispatch"]["alive"] and s["workers"]["dispatch"]["restarts"] == 1
    assert len(results.wait_count(N - lost)) == N - lost
    assert s["health"]["healthy"]


def test_a_launch_fault_is_a_pipeline_error_and_the_next_batches_pass(running, results, frames, monkeypatch):
    worker, pusher = running()
    monkeypatch.setattr(worker.pipeline, "finder", FailOnce(worker.pipeline.finder))
    pusher.send(frames)
    s = wait_stats(worker, lambda s: s["processed"] + s["rejected"].get("pipeline_error", 0) == N)
    failed = s["rejected"]["pipeline_error"]
    assert 1 <= failed <= 4 and s["processed"] == N - failed and balanced(s)
    assert len(results.wait_count(N - failed)) == N - failed


def test_a_result_thread_fault_is_counted_and_the_thread_restarts(running, results, frames, monkeypatch):
    worker, pusher = running()
    monkeypatch.setattr(worker, "_deliver", FailOnce(worker._deliver))
    pusher.send(frames)
    s = wait_stats(worker, lambda s: s["processed"] + s["rejected"].get("internal_error", 0) == N)
    lost = s["rejected"]["internal_error"]
    assert 1 <= lost <= 4 and balanced(s)
    assert s["thread_failures"] == {"results": 1} and s["workers"]["results"]["restarts"] == 1
    assert len(results.wait_count(N - lost)) == N - lost


def test_a_cxi_writer_fault_is_a_sink_error_and_the_writer_restarts(running, results, frames, monkeypatch, tmp_path):
    worker, pusher = running()
    monkeypatch.setattr(worker._sinks["cxi"], "_handle", FailOnce(worker._sinks["cxi"]._handle))
    pusher.send(frames)
    assert len(results.wait_count(N)) == N  # results do not wait for the disk
    s = wait_stats(worker, lambda s: s["sink_errors"].get("cxi", 0) == 1 and s["processed"] == N)
    assert s["thread_failures"] == {"cxi": 1} and s["workers"]["cxi"]["alive"] and balanced(s)
    worker.stop()
    assert len(cxi_events(tmp_path / "cxi")) == N - 1  # the one event the failed loop held


def test_a_killed_ingest_process_is_counted_and_started_again(running, results, frames):
    worker, pusher = running(pipeline={"max_batch_delay_ms": 60000})  # frames wait in the open batch
    first = worker.stats()["workers"]["ingest-0"]["pid"]
    pusher.send(frames[:2])
    wait_stats(worker, lambda s: s["frames_in"] == 2)
    os.kill(first, signal.SIGKILL)
    s = wait_stats(worker, lambda s: s["rejected"].get("internal_error", 0) == 2
                   and s["workers"]["ingest-0"]["alive"] and s["workers"]["ingest-0"]["pid"] != first)
    assert s["thread_failures"] == {"ingest": 1} and s["processed"] == 0 and balanced(s)
    pusher.send(frames[2:6], first_seq=2)  # a full batch: goes at once
    got = results.wait_count(4)
    assert sorted(r["seq"] for r in got) == [2, 3, 4, 5]
    s = wait_stats(worker, lambda s: s["processed"] == 4)
    assert balanced(s) and s["health"]["healthy"]


def test_a_killed_results_sender_is_started_again_and_results_go_on(running, results, frames):
    worker, pusher = running()
    pusher.send(frames[:4])
    assert len(results.wait_count(4)) == 4
    first = worker.stats()["workers"]["results-sender"]["pid"]
    os.kill(first, signal.SIGKILL)
    wait_stats(worker, lambda s: not s["workers"]["results-sender"]["alive"])
    pusher.send(frames[4:8], first_seq=4)
    assert sorted(r["seq"] for r in results.wait_count(8)) == list(range(8))
    s = wait_stats(worker, lambda s: s["processed"] == 8 and s["workers"]["results-sender"]["alive"])
    assert s["workers"]["results-sender"]["starts"] == 2 and s["workers"]["results-sender"]["pid"] != first
    assert s["results_dropped"] == {} and s["sender_rss_bytes"] > 0 and balanced(s)


def test_a_stalled_pipeline_is_unhealthy_until_frames_move_again(running, results, frames, monkeypatch):
    worker, pusher = running(health={"stall_s": 1.0})
    release = threading.Event()
    wait_done = worker.pipeline._wait_done

    def stuck(*args, **kwargs):  # the device never says the batch is done, until released
        release.wait()
        return wait_done(*args, **kwargs)

    monkeypatch.setattr(worker.pipeline, "_wait_done", stuck)
    pusher.send(frames[:4])
    s = wait_stats(worker, lambda s: s["health"]["stalled"])
    assert not s["health"]["healthy"] and "no batch finished" in s["health"]["problems"][0]
    release.set()
    s = wait_stats(worker, lambda s: s["processed"] == 4 and s["health"]["healthy"])
    assert balanced(s)


def test_a_thread_that_keeps_failing_stays_dead_and_the_worker_says_so(running, results, frames, monkeypatch):
    worker, pusher = running(health={"max_thread_restarts": 1})

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault, every time")

    monkeypatch.setattr(worker, "_deliver", broken)
    pusher.send(frames[:12])
    s = wait_stats(worker, lambda s: not s["workers"]["results"]["alive"])
    assert s["thread_failures"]["results"] == 2 and not s["health"]["healthy"]
    assert "results thread dead" in s["health"]["problems"]


def test_an_lclstreamer_batch_larger_than_a_slot_fills_several(tmp_path, results, frames):
    import io
    cfg = runtime_config(tmp_path, results.endpoint)
    cfg = config_from_dict({**{k: v for k, v in config_to_dict(cfg).items()},
                            "ingest": {"sockets": [{"endpoint": f"ipc://{tmp_path}/npz.ipc", "mode": "bind",
                                                    "format": "lclstreamer-npz"}]}}, "<test>")
    worker = Worker(cfg)
    pusher = Pusher(worker.endpoints[0])
    try:
        buf = io.BytesIO()
        np.savez(buf, detector_data=np.stack(frames[:10]), timestamp=np.arange(10.0))
        pusher.sock.send(buf.getvalue())  # 10 frames in one message, 4 per slot
        got = results.wait_count(10)
        final = worker.stop()
    finally:
        pusher.close()
    assert len(got) == 10 and final["processed"] == 10 and balanced(final)
    assert final["thread_failures"] == {}


@pytest.mark.parametrize("trial", range(20))
def test_stop_drains_the_sockets_queues_and_accounts_for_every_message(tmp_path, results, frames, trial):
    worker = Worker(runtime_config(tmp_path, results.endpoint))
    pusher = Pusher(worker.endpoints[0])
    try:
        pusher.send(frames)
        pusher.sock.send_multipart([b"not a header"])
        wait_stats(worker, lambda s: s["frames_in"] >= 8)  # flowing
        pusher.close(linger_ms=10_000)  # every message has left the producer: the rest is in the worker's socket
        final = worker.stop()
    finally:
        pusher.close()
    assert final["received"] == N + 1  # every queued message was taken off the socket
    assert final["rejected"] == {"not_msgpack": 1} and final["processed"] == N and balanced(final)
    assert len(results.wait_count(N, timeout=30)) == N
    assert not list((tmp_path / "cxi").glob("*.tmp")) and len(cxi_events(tmp_path / "cxi")) == N


def test_a_results_consumer_that_is_gone_bounds_memory_and_stop(tmp_path, frames):
    """Results go to an address where no consumer listens any more: the stream fills (one
    result), backpressure stops the intake at the slots, and stop still ends in time."""
    cfg = runtime_config(tmp_path, f"tcp://127.0.0.1:{free_port()}", output={"results_sndhwm": 1},
                         shutdown={"timeout_s": 6, "drain_s": 1})
    worker = Worker(cfg)
    pusher = Pusher(worker.endpoints[0])
    try:
        for _ in range(10):
            pusher.send(frames)
        slots_frames = len(worker.pipeline.slots) * cfg.pipeline.batch_size
        wait_stats(worker, lambda s: s["frames_in"] >= slots_frames)
        t0 = time.monotonic()
        final = worker.stop()
        took = time.monotonic() - t0
    finally:
        pusher.close()
    assert took < cfg.shutdown.timeout_s + 2
    assert final["received"] <= slots_frames + 2 * cfg.pipeline.batch_size < 10 * N  # backpressure held
    assert balanced(final) and final["results_dropped"].get("closed", 0) > 0
    assert not list((tmp_path / "cxi").glob("*.tmp"))
