"""CXI layout read back with h5py, the geometry file, the results stream, and I/O errors."""

from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest
import zmq

from peaknet_daemon.config import OutputConfig
from peaknet_daemon.sinks import CxiWriter, ResultStream, SinkError, write_geometry
from peaknet_daemon.sinks.cxi_file import default_max_peaks
from peaknet_daemon.wire import RESULT_PROTO, decode_result

SHAPE = (3, 8, 12)  # panels, H, W


def make_result(seq: int, peaks: list[tuple[int, float, float, float, int]], run: int | str = 7,
                hit: bool | None = None) -> dict:
    cols = list(zip(*peaks)) if peaks else [(), (), (), (), ()]
    result = {
        "proto": RESULT_PROTO, "source": "det0", "seq": seq, "run": run, "timestamp_ns": 1_700_000_000_123_456_789 + seq,
        "n_peaks": len(peaks),
        "peaks": {"panel": list(cols[0]), "y": list(cols[1]), "x": list(cols[2]),
                  "intensity": list(cols[3]), "npix": list(cols[4])},
        "latency_ms": 1.5, "worker": "actor-0",
    }
    if hit is not None:
        result["hit"] = hit
    return result


def frame(seq: int) -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + seq * 1000)


def writer(tmp_path, **kw) -> CxiWriter:
    args = dict(out_dir=tmp_path, prefix="actor-0", frame_shape=SHAPE, dtype=np.float32, max_peaks=4,
                frames_per_file=100, save_frames="all", hit_threshold=2, grow_by=2)
    args.update(kw)
    return CxiWriter(**args)


def test_layout_slab_positions_padding_and_per_event_data(tmp_path):
    w = writer(tmp_path)
    peaks0 = [(0, 1.5, 2.25, 100.0, 3), (2, 7.0, 11.0, 50.0, 5)]
    peaks1 = [(1, 3.0, 4.0, 10.0, 1)]
    assert w.write(make_result(0, peaks0), frame(0), meta={"photon_energy_ev": 9500.0, "detector_distance_mm": 120.0})
    assert w.write(make_result(1, peaks1), frame(1))
    assert w.write(make_result(2, []), frame(2))
    assert list(tmp_path.glob("*.cxi")) == []  # still .tmp while open
    w.close()
    w.close()  # idempotent
    files = w.files()
    assert len(files) == 1 and files[0].name == "actor-0-r7-0000.cxi"
    assert not list(tmp_path.glob("*.tmp"))
    with h5py.File(files[0], "r") as f:
        r = f["/entry_1/result_1"]
        assert r["nPeaks"][:].tolist() == [2, 1, 0]
        for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakSegPosRaw", "peakNPixels"):
            assert r[name].shape == (3, 4), name
        H = SHAPE[1]
        np.testing.assert_allclose(r["peakYPosRaw"][0], [0 * H + 1.5, 2 * H + 7.0, 0, 0])
        np.testing.assert_allclose(r["peakXPosRaw"][0], [2.25, 11.0, 0, 0])
        np.testing.assert_allclose(r["peakYPosRaw"][1], [1 * H + 3.0, 0, 0, 0])
        assert r["peakSegPosRaw"][0].tolist() == [0, 2, 0, 0]
        assert r["peakNPixels"][0].tolist() == [3, 5, 0, 0]
        np.testing.assert_allclose(r["peakTotalIntensity"][0], [100.0, 50.0, 0, 0])
        assert not r["peakXPosRaw"][2].any()
        data = f["/entry_1/data_1/data"]
        assert data.shape == (3, SHAPE[0] * SHAPE[1], SHAPE[2])
        assert data.chunks == (1, SHAPE[0] * SHAPE[1], SHAPE[2])
        assert data.compression == "gzip"
        np.testing.assert_array_equal(data[1], frame(1).reshape(-1, SHAPE[2]))
        # a peak's slab position indexes the same pixel as (panel, y, x) in the frame
        assert data[0][2 * H + 7, 11] == frame(0)[2, 7, 11]
        assert f["/entry_1/seq"][:].tolist() == [0, 1, 2]
        assert [s.decode() for s in f["/entry_1/source"][:]] == ["det0"] * 3
        assert f["/entry_1/timestamp_ns"][0] == 1_700_000_000_123_456_789
        assert f["/LCLS/photon_energy_eV"][0] == 9500.0 and np.isnan(f["/LCLS/photon_energy_eV"][1])
        assert f["/LCLS/detector_1/EncoderValue"][0] == 120.0
        # every dataset's first axis is the file's events
        def check(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 1:
                assert obj.shape[0] == 3, name
        f.visititems(check)


def test_hits_only_and_none(tmp_path):
    w = writer(tmp_path / "hits", save_frames="hits")
    assert not w.write(make_result(0, [(0, 1, 1, 1, 1)]), frame(0))          # 1 peak < threshold 2
    assert w.write(make_result(1, [(0, 1, 1, 1, 1)] * 2), frame(1))          # 2 peaks: a hit
    assert not w.write(make_result(2, [(0, 1, 1, 1, 1)] * 3, hit=False), frame(2))  # the result decides
    w.close()
    with h5py.File(w.files()[0], "r") as f:
        assert f["/entry_1/seq"][:].tolist() == [1]
        assert f["/entry_1/data_1/data"].shape[0] == 1

    w = writer(tmp_path / "none", save_frames="none")
    assert w.write(make_result(0, []), None)
    assert w.write(make_result(1, [(0, 1, 1, 1, 1)]), None)
    w.close()
    with h5py.File(w.files()[0], "r") as f:
        assert "/entry_1/data_1/data" not in f
        assert f["/entry_1/result_1/nPeaks"][:].tolist() == [0, 1]


def test_rotation_runs_and_truncation(tmp_path):
    w = writer(tmp_path, frames_per_file=2, max_peaks=2)
    for seq in range(5):
        w.write(make_result(seq, [(0, 1, 1, 1, 1)] * 3), frame(seq))
    assert [p.name for p in w.files()] == ["actor-0-r7-0000.cxi", "actor-0-r7-0001.cxi"]
    w.write(make_result(5, [], run="b"), frame(5))   # a new run starts a new file
    assert len(w.files()) == 3
    w.run_end("other")                                # not the open file's run
    assert len(w.files()) == 3
    w.run_end("b")
    assert [p.name for p in w.files()][-1] == "actor-0-rb-0000.cxi"
    assert w.peaks_truncated == 5  # 3 peaks, 2 columns, 5 events
    counts = []
    for p in w.files():
        with h5py.File(p, "r") as f:
            counts.append(f["/entry_1/result_1/nPeaks"][:].tolist())
    assert counts == [[2, 2], [2, 2], [2], [0]]
    assert not list(tmp_path.glob("*.tmp"))


def test_oserror_raises_sinkerror_and_writer_recovers(tmp_path, monkeypatch):
    w = writer(tmp_path)
    w.write(make_result(0, []), frame(0))
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def disk_full(self, key, value):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    with pytest.raises(SinkError, match="No space left"):
        w.write(make_result(1, []), frame(1))
    assert calls["n"] == 1
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    assert w.write(make_result(2, []), frame(2))  # a new file, not a crash loop
    w.close()
    assert [p.name for p in w.files()] == ["actor-0-r7-0001.cxi"]
    assert (tmp_path / "actor-0-r7-0000.cxi.partial").exists()
    with h5py.File(w.files()[0], "r") as f:
        assert f["/entry_1/seq"][:].tolist() == [2]


def test_open_failure_raises_sinkerror(tmp_path, monkeypatch):
    w = writer(tmp_path)
    real = h5py.File

    def no_file(*a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(h5py, "File", no_file)
    with pytest.raises(SinkError):
        w.write(make_result(0, []), frame(0))
    monkeypatch.setattr(h5py, "File", real)
    assert w.write(make_result(1, []), frame(1))
    w.close()
    assert len(w.files()) == 1


def test_bad_frame_shape_is_a_value_error(tmp_path):
    w = writer(tmp_path)
    with pytest.raises(ValueError):
        w.write(make_result(0, []), np.zeros((2, 8, 12), np.float32))


def test_geometry_file(tmp_path):
    w = writer(tmp_path)
    w.write(make_result(0, []), frame(0))
    w.close()
    assert w.geometry_path == tmp_path / "peaknet-slab-3x8x12.geom"
    text = (tmp_path / "peaknet-slab-3x8x12.geom").read_text()
    lines = {ln.split("=")[0].strip(): ln.split("=", 1)[1].strip()
             for ln in text.splitlines() if "=" in ln and not ln.startswith(";")}
    assert lines["peak_list"] == "/entry_1/result_1"
    assert lines["data"] == "/entry_1/data_1/data"
    assert (lines["dim0"], lines["dim1"], lines["dim2"]) == ("%", "ss", "fs")
    assert lines["photon_energy"] == "/LCLS/photon_energy_eV"
    assert lines["clen"] == "/LCLS/detector_1/EncoderValue"
    assert float(lines["res"]) == pytest.approx(10000)
    H, W = SHAPE[1], SHAPE[2]
    for p in range(SHAPE[0]):
        assert int(lines[f"p{p}/min_ss"]) == p * H and int(lines[f"p{p}/max_ss"]) == (p + 1) * H - 1
        assert int(lines[f"p{p}/min_fs"]) == 0 and int(lines[f"p{p}/max_fs"]) == W - 1
        assert f"p{p}/corner_x" in lines and f"p{p}/fs" in lines
    assert f"p{SHAPE[0]}/min_ss" not in lines
    epix = write_geometry(tmp_path / "epix.geom", (16, 352, 384)).read_text()
    assert "p15/max_ss = 5631" in epix
    assert default_max_peaks(256, 16) == 2048 and default_max_peaks(10, 3) == 30


# ----------------------------------------------------------------------------------------------
# Results stream
# ----------------------------------------------------------------------------------------------

def test_push_round_trip_and_linger(tmp_path):
    ctx = zmq.Context()
    try:
        cfg = OutputConfig(results_endpoint="tcp://127.0.0.1:*", results_mode="push", results_bind=True)
        stream = ResultStream(cfg, zmq_context=ctx)
        pull = ctx.socket(zmq.PULL)
        pull.connect(stream.endpoint)
        sent = [make_result(i, [(1, 2.0, 3.0, 4.0, 5)]) for i in range(20)]
        for r in sent:
            assert stream.send(r)
        stream.close()  # queued results are still delivered (linger)
        got = []
        for _ in sent:
            assert pull.poll(5000)
            got.append(decode_result(pull.recv()))
        assert [g["seq"] for g in got] == list(range(20))
        assert got[0]["proto"] == RESULT_PROTO
        assert got[0]["peaks"] == {"panel": [1], "y": [2.0], "x": [3.0], "intensity": [4.0], "npix": [5]}
        assert stream.stats()["sent"] == 20
        assert not stream.send(sent[0])  # closed: refused, counted
        assert stream.dropped == {"closed": 1}
        pull.close(0)
    finally:
        ctx.term()


def test_push_blocks_until_closed_when_nobody_reads():
    ctx = zmq.Context()
    try:
        cfg = OutputConfig(results_endpoint="inproc://blocked", results_mode="push", results_bind=True,
                           results_sndhwm=1)
        stream = ResultStream(cfg, zmq_context=ctx, poll_ms=10, linger_ms=0)
        # no peer at all: PUSH cannot queue, so send blocks; close() from another thread ends it
        import threading
        done = threading.Event()
        out = {}

        def sender():
            out["ok"] = stream.send(make_result(0, []))
            done.set()

        t = threading.Thread(target=sender)
        t.start()
        assert not done.wait(0.3)  # still blocked: backpressure, not loss
        stream.close()
        assert done.wait(5)
        t.join()
        assert out["ok"] is False and stream.dropped == {"closed": 1}
    finally:
        ctx.term()


def test_pub_drops_without_subscriber_and_delivers_with_one():
    ctx = zmq.Context()
    try:
        cfg = OutputConfig(results_endpoint="tcp://127.0.0.1:*", results_mode="pub", results_bind=True)
        stream = ResultStream(cfg, zmq_context=ctx)
        assert not stream.send(make_result(0, []))
        assert stream.dropped == {"no_subscriber": 1}
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(stream.endpoint)
        seq = 1
        while not sub.poll(50):  # the subscription reaches the XPUB asynchronously
            stream.send(make_result(seq, []))
            seq += 1
            assert seq < 200
        assert decode_result(sub.recv())["seq"] >= 1
        assert stream.sent >= 1
        stream.close(0)
        sub.close(0)
    finally:
        ctx.term()


def test_bind_failure_is_a_sink_error():
    ctx = zmq.Context()
    try:
        cfg = OutputConfig(results_endpoint="tcp://127.0.0.1:*", results_bind=True)
        a = ResultStream(cfg, zmq_context=ctx)
        taken = OutputConfig(results_endpoint=a.endpoint, results_bind=True)
        with pytest.raises(SinkError):
            ResultStream(taken, zmq_context=ctx)
        a.close(0)
    finally:
        ctx.term()


def test_run_writers_close_a_run_after_its_queued_events_and_count_errors(tmp_path):
    from peaknet_daemon.config import config_from_dict
    from peaknet_daemon.sinks.cxi import CxiSink

    cfg = config_from_dict({"pipeline": {"frame_shape": list(SHAPE), "dtype": "float32", "max_peaks": 4},
                            "output": {"cxi_dir": str(tmp_path), "save_frames": "all"}})
    errors = []
    sink = CxiSink(cfg, "w0", errors.append, queue_frames=2)
    for seq in range(5):  # more than the queue holds: put() waits for the writer
        sink.put(make_result(seq, [(0, 1.0, 2.0, 3.0, 1)], run=1), frame(seq))
    sink.put(make_result(9, [], run=1), None)  # save_frames 'all' needs the frame: an error, not a crash
    files = sink.close_run(1)
    assert len(files) == 1 and files[0].endswith(".cxi")
    with h5py.File(files[0], "r") as f:
        assert f["/entry_1/seq"][:].tolist() == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(f["/entry_1/data_1/data"][4], frame(4).reshape(-1, SHAPE[2]))
    assert len(errors) == 1 and "needs the frame" in str(errors[0])
    sink.put(make_result(10, [], run=2), frame(10))
    sink.close()
    assert sorted(p.name for p in tmp_path.glob("*.cxi")) == ["w0-r1-0000.cxi", "w0-r2-0000.cxi"]
    assert (tmp_path / "peaknet-slab.geom").exists() and not list(tmp_path.glob("*.tmp"))
