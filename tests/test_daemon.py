"""The daemon end to end: `peaknet-daemon --config` as a subprocess with embedded Ray and two
CPU actors, fed by `peaknet-producer` over TCP loopback, results read from the results stream,
CXI files and the metrics endpoint.

One daemon serves the tests of this module in order (a start costs seconds): 300 frames, then
bad input interleaved with good frames, then an actor killed with SIGKILL. The SIGTERM and
sd_notify checks get a daemon of their own.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from harness import SMALL_SHAPE, Daemon, Results, free_port, free_port_pair, producer, small_config
from peaknet_daemon.wire import encode_control, encode_frame

pytestmark = pytest.mark.slow
SHAPE_ARG = ",".join(map(str, SMALL_SHAPE))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("daemon")
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    results = Results(res_port)
    daemon = Daemon(small_config(tmp, in_port, res_port, met_port), tmp)
    try:
        daemon.wait_ready()
        yield daemon, results, in_port, tmp
    finally:
        rc = daemon.terminate()
        results.close()
        assert rc == 0, daemon.tail()


def cxi_events(cxi_dir: Path, run) -> dict[tuple[str, int], int]:
    """(source, seq) -> nPeaks over the run's completed CXI files."""
    events = {}
    for path in sorted(cxi_dir.glob(f"*-r{run}-*.cxi")):
        with h5py.File(path, "r") as f:
            n_peaks = f["/entry_1/result_1/nPeaks"][:]
            seqs = f["/entry_1/seq"][:]
            sources = [s.decode() if isinstance(s, bytes) else s for s in f["/entry_1/source"][:]]
            assert f["/entry_1/data_1/data"].shape[0] == len(n_peaks)
            for src, seq, n in zip(sources, seqs, n_peaks):
                assert (src, int(seq)) not in events
                events[(src, int(seq))] = int(n)
    return events


def test_300_frames_each_once_in_results_cxi_and_metrics(stack):
    daemon, results, in_port, tmp = stack
    p = producer("bragg", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", "300",
                 "--rate", "0", "--source", "p0", "--run", "1", "--seed", "0", "--shape", SHAPE_ARG,
                 "--truth", str(tmp / "truth.jsonl"))
    got = results.wait_count(300, where=lambda r: r["run"] == 1)
    assert p.wait(timeout=60) == 0, p.stderr.read()
    done = daemon.wait_event("run_complete", where=lambda e: e["run"] == 1)
    assert done["count"] == 300 and done["processed"] == 300 and done["missing"] == 0

    keys = Counter((r["source"], r["seq"]) for r in got)
    assert len(got) == 300 and max(keys.values()) == 1
    seqs = sorted(seq for _, seq in keys)
    assert seqs == list(range(seqs[0], seqs[0] + 300))
    assert {r["worker"] for r in got} and all(r["proto"] == "peaknet-result/1" for r in got)
    assert sum(r["n_peaks"] for r in got) > 300  # the simulated frames do have peaks

    events = cxi_events(tmp / "cxi", 1)
    assert events == {(r["source"], r["seq"]): r["n_peaks"] for r in got}
    assert not list((tmp / "cxi").glob("*.tmp"))
    assert (tmp / "cxi" / "peaknet-slab.geom").exists()

    m = daemon.wait_metric("peaknet_frames_processed_total", lambda v: v >= 300)
    assert m["peaknet_frames_processed_total"] == 300
    assert m["peaknet_frames_received_total"] == 300
    assert m["peaknet_peaks_found_total"] == sum(r["n_peaks"] for r in got)


def bad_then_good(n_good: int):
    """Each bad message is followed by a good frame; returns (messages, reasons)."""
    import msgpack
    good = np.ones(SMALL_SHAPE, np.uint16)
    header = msgpack.unpackb(encode_frame(good, "bad", 0)[0])
    float_frame = np.ones(SMALL_SHAPE, np.float32)
    float_frame[0, 0, 0] = np.inf
    bad = [
        ("not_msgpack", [os.urandom(64)]),
        ("not_msgpack", [b"\xc1 not msgpack", good.tobytes()]),
        ("unknown_proto", [msgpack.packb({**header, "proto": "x/9"}), good.tobytes()]),
        ("bad_header", [msgpack.packb({k: v for k, v in header.items() if k != "seq"}), good.tobytes()]),
        ("wrong_shape", [msgpack.packb({**header, "shape": [2, 64, 63]}), good.tobytes()[:-2 * 2 * 64]]),
        ("wrong_dtype", encode_frame(float_frame, "bad", 0)),
        ("size_mismatch", [msgpack.packb(header), good.tobytes()[:-10]]),
        ("oversize", [msgpack.packb(header), b"\0" * (600 << 10), b"\0" * (600 << 10)]),  # parts < limit
        ("bad_meta", [msgpack.packb({**header, "meta": {"photon_energy_ev": "9.5 keV"}}), good.tobytes()]),
        ("out_of_range", [msgpack.packb({**header, "seq": 2**63}), good.tobytes()]),
    ]
    messages, reasons = [], []
    for i in range(n_good):
        reason, parts = bad[i % len(bad)]
        messages.append(parts)
        reasons.append(reason)
        messages.append(encode_frame(np.full(SMALL_SHAPE, i, np.uint16), "bad", i, run=2))
    return messages, reasons


def test_bad_input_is_rejected_counted_and_good_frames_pass(stack):
    daemon, results, in_port, _ = stack
    before = daemon.metrics()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(f"tcp://127.0.0.1:{in_port}")  # a new producer on the old port: ZMQ reconnects
    messages, reasons = bad_then_good(40)
    push.send_multipart(encode_control("start", "bad", run=2))
    for parts in messages:
        push.send_multipart(parts)
    push.send_multipart(encode_control("end", "bad", run=2, count=40))
    got = results.wait_count(40, where=lambda r: r["run"] == 2)
    push.close(linger=5000)
    ctx.term()
    assert sorted(r["seq"] for r in got) == list(range(40))
    daemon.wait_event("run_complete", where=lambda e: e["run"] == 2)
    expected = Counter(reasons)

    def rejected(m, reason):
        return m.get(f'peaknet_frames_rejected_total{{reason="{reason}"}}', 0.0)

    after = daemon.wait_metrics(lambda m: all(rejected(m, r) - rejected(before, r) >= n for r, n in expected.items()))
    for reason, n in expected.items():
        assert rejected(after, reason) - rejected(before, reason) == n, reason
    logged = Counter(e["reason"] for e in daemon.find("frame_rejected"))
    assert set(logged) == set(expected)
    assert all(n <= 2 for n in logged.values())  # once per reason per interval, per actor
    assert daemon.proc.poll() is None


def test_killed_actor_is_restarted_and_processing_resumes(stack):
    daemon, results, in_port, tmp = stack
    ready = daemon.find("actor_ready")
    victim = ready[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    event = daemon.wait_event("actor_restarted", timeout=30)
    assert event["pid"] != victim
    daemon.wait_metric("peaknet_actor_restarts_total", lambda v: v >= 1)
    p = producer("bragg", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", "100",
                 "--rate", "0", "--source", "p3", "--run", "3", "--seed", "3", "--shape", SHAPE_ARG)
    got = results.wait_count(100, timeout=60, where=lambda r: r["run"] == 3)
    assert p.wait(timeout=60) == 0
    assert sorted(r["seq"] for r in got) == sorted({r["seq"] for r in got}) and len(got) == 100


def test_sigterm_mid_stream_loses_nothing_and_notifies_systemd(tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0.2)
    messages: list[str] = []
    listening = threading.Event()
    listening.set()

    def listen():  # like systemd: read every notification as it comes
        while listening.is_set():
            try:
                messages.append(notify.recv(4096).decode())
            except OSError:
                pass

    listener = threading.Thread(target=listen)
    listener.start()
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    results = Results(res_port)
    daemon = Daemon(small_config(tmp_path, in_port, res_port, met_port), tmp_path,
                    env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "2000000"})
    try:
        daemon.wait_ready()
        p = producer("bragg", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", "5000",
                     "--rate", "200", "--source", "p4", "--run", "4", "--seed", "4", "--shape", SHAPE_ARG)
        results.wait_count(60)
        rc = daemon.terminate()
        p.kill()
        p.wait()
    finally:
        daemon.kill()
    listening.clear()
    listener.join()
    notify.close()
    assert rc == 0, daemon.tail()
    stopped = daemon.wait_event("daemon_stopped")
    got = results.wait_count(stopped["frames_processed"], timeout=10)
    results.close()
    assert stopped["frames_received"] == stopped["frames_processed"] == len(got) > 60
    assert len({r["seq"] for r in got}) == len(got)
    events = cxi_events(tmp_path / "cxi", 4)
    assert len(events) == len(got)
    assert not list((tmp_path / "cxi").glob("*.tmp"))
    joined = "\n".join(messages)
    assert "WATCHDOG=1" in joined and "STATUS=" in joined
    assert joined.index("READY=1") < joined.index("STOPPING=1")


def test_bind_mode_each_actor_binds_base_port_plus_index(tmp_path):
    res_port, met_port = free_port(), free_port()
    base = free_port_pair()
    while {base, base + 1} & {res_port, met_port}:
        base = free_port_pair()
    cfg = small_config(tmp_path, base, res_port, met_port)
    cfg["ingest"]["sockets"][0]["mode"] = "bind"
    results = Results(res_port)
    daemon = Daemon(cfg, tmp_path)
    try:
        ready = daemon.wait_event("daemon_ready")
        assert ready["endpoints"] == [f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}"]
        procs = [producer("bragg", "--endpoint", f"tcp://127.0.0.1:{base + i}", "--connect", "--frames", "20",
                          "--rate", "0", "--source", f"b{i}", "--run", "5", "--seed", str(i), "--shape", SHAPE_ARG)
                 for i in range(2)]
        got = results.wait_count(40, timeout=60)
        assert all(p.wait(timeout=60) == 0 for p in procs)
        assert Counter(r["source"] for r in got) == {"b0": 20, "b1": 20}
        assert {r["worker"] for r in got if r["source"] == "b0"} != {r["worker"] for r in got if r["source"] == "b1"}
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()
        results.close()
