"""The CrystFEL live hand-off, read the way indexamajig reads it: a REQ socket asks for the next
hit, the reply's keys are looked up with CrystFEL's own rule (a map key matches a name that
starts with it, first match wins) at the names the written geometry file gives.

Unit tests drive the sink directly; the end-to-end test asks a live CPU daemon (two actors,
bind ports base and base + 1) for every hit and compares with its results stream and CXI files.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest
import zmq

from harness import SMALL_SHAPE, Daemon, Results, free_port, free_port_pair, metrics_from, producer, small_config
from peaknet_daemon.config import Config, ConfigError, config_from_dict
from peaknet_daemon.sinks import SINKS
from peaknet_daemon.sinks.crystfel_live import LOOKUPS, RECORD_KEYS, CrystfelLiveSink
from test_geometry import asic_geometry, key_values

SHAPE = (2, 16, 24)


def crystfel_lookup(obj: dict, name: str):
    """CrystFEL's find_msgpack_kv (libcrystfel image-msgpack.c): strncmp(map key, name, length of
    the map key) == 0, the first such key in map order; None when there is none."""
    for key, value in obj.items():
        k = key.encode() if isinstance(key, str) else key
        if name.encode()[:len(k)] == k:
            return value
    return None


class Indexer:
    """A stand-in for indexamajig --zmq-request=next: one REQ socket, one request per frame."""

    def __init__(self, endpoint: str, geometry: Path, timeout_ms: int = 30000):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        kv = key_values(geometry.read_text())
        self.data_key, self.peaks_key = kv["data"], kv["peak_list"]
        (self.energy_key, unit_e), (self.clen_key, unit_c) = kv["photon_energy"].split(), kv["clen"].split()
        assert (unit_e, unit_c) == ("eV", "mm")

    def request(self) -> dict:
        """Ask for the next hit; what CrystFEL would read from the reply."""
        self.sock.send(b"next")
        obj = msgpack.unpackb(self.sock.recv(), raw=False)
        data, peaks = crystfel_lookup(obj, self.data_key), crystfel_lookup(obj, self.peaks_key)
        assert crystfel_lookup(data, "type") == "<f4"
        ss_n, fs_n = crystfel_lookup(data, "shape")
        image = np.frombuffer(crystfel_lookup(data, "data"), dtype="<f4").reshape(ss_n, fs_n)
        cols = {k: crystfel_lookup(peaks, k) for k in ("fs", "ss", "intensity")}
        assert all(isinstance(v, float) for c in cols.values() for v in c)  # CrystFEL reads them as float64
        assert len({len(c) for c in cols.values()}) == 1
        return {"image": image, **{k: np.asarray(v) for k, v in cols.items()},
                "photon_energy_ev": crystfel_lookup(obj, self.energy_key),
                "detector_distance_mm": crystfel_lookup(obj, self.clen_key), "seq": obj["seq"],
                "source": obj["source"], "run": obj["run"]}

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def live_config(tmp_path: Path, **output) -> Config:
    return config_from_dict({"pipeline": {"frame_shape": list(SHAPE), "dtype": "uint16"},
                             "output": {"cxi_dir": str(tmp_path), "hit_threshold": 1, **output}}, "<test>")


def hit(seq: int, n: int = 2, meta: dict | None = None) -> dict:
    rng = np.random.default_rng(seq)
    return {"source": "det", "seq": seq, "run": 4, "timestamp_ns": 10 + seq, "n_peaks": n,
            "peaks": {"panel": rng.integers(0, SHAPE[0], n).astype(np.int32),
                      "y": rng.uniform(0, SHAPE[1] - 1, n), "x": rng.uniform(0, SHAPE[2] - 1, n),
                      "intensity": rng.uniform(1, 1e4, n).astype(np.float32), "npix": np.ones(n, np.int32)},
            "meta": meta if meta is not None else {"photon_energy_ev": 9000.0 + seq, "detector_distance_mm": 90.0}}


def image(seq: int) -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE) + seq).astype(np.uint16)


@pytest.fixture
def sink(tmp_path):
    ctx = zmq.Context()
    errors: list = []
    made: list[CrystfelLiveSink] = []

    def make(queue_hits: int = 64, geometry: str = "") -> CrystfelLiveSink:
        cfg = live_config(tmp_path, crystfel_endpoint="tcp://127.0.0.1:5999")
        if geometry:
            cfg = config_from_dict({**{"pipeline": {"frame_shape": list(SHAPE), "dtype": "uint16"},
                                       "output": {"cxi_dir": str(tmp_path), "hit_threshold": 1}},
                                    "detector": {"geometry": geometry}}, "<test>")
        s = CrystfelLiveSink(cfg, "tcp://127.0.0.1:*", str(tmp_path / "live.geom"), ctx, errors.append,
                             queue_hits=queue_hits)
        made.append(s)
        return s

    yield make
    for s in made:
        assert s.close(5.0)
    ctx.term()
    assert not errors


def test_a_request_gets_the_next_hit_in_crystfels_layout(sink, tmp_path):
    s = sink()
    assert s.wants_frame(1) and not s.wants_frame(0)
    indexer = Indexer(s.endpoint, s.geometry_path)
    got: dict = {}
    waiting = threading.Thread(target=lambda: got.update(indexer.request()))
    waiting.start()  # the request is made before any hit exists: it waits for one
    s.put(hit(0, n=0), None)  # a frame not kept (no data) is not a hit for the indexer
    s.put(hit(5), image(5))
    waiting.join(30)
    assert got, "no reply"
    r = hit(5)
    p, h, w = SHAPE
    np.testing.assert_array_equal(got["image"], image(5).reshape(p * h, w).astype(np.float32))
    # ss = panel*H + y, fs = x, no offset: indexamajig's default half-pixel shift applies, as for CXI
    np.testing.assert_array_equal(got["fs"], r["peaks"]["x"])
    np.testing.assert_array_equal(got["ss"], r["peaks"]["panel"] * h + r["peaks"]["y"])
    np.testing.assert_array_equal(got["intensity"], r["peaks"]["intensity"].astype(np.float64))
    assert (got["photon_energy_ev"], got["detector_distance_mm"], got["seq"]) == (9005.0, 90.0, 5)
    assert s.served == 1 and s.dropped == {}
    indexer.close()


def test_no_key_of_a_message_shadows_a_name_crystfel_looks_up(sink):
    s = sink()
    indexer = Indexer(s.endpoint, s.geometry_path)
    s.put(hit(1), image(1))
    indexer.sock.send(b"next")
    obj = msgpack.unpackb(indexer.sock.recv(), raw=False)
    keys = list(obj)
    assert set(LOOKUPS) | set(RECORD_KEYS) == set(keys)
    for name in LOOKUPS:  # the key CrystFEL finds for `name` is `name` itself
        first = next(k for k in keys if name.startswith(k))
        assert first == name
    indexer.close()


def test_queue_overflow_drops_the_oldest_and_counts(sink):
    s = sink(queue_hits=3)
    for seq in range(10):
        s.put(hit(seq), image(seq))
    assert s.dropped == {"crystfel_queue_full": 7}
    indexer = Indexer(s.endpoint, s.geometry_path)
    assert [indexer.request()["seq"] for _ in range(3)] == [7, 8, 9]  # the newest, in order
    s.put(hit(10), image(10))
    s.put(hit(11), image(11))
    indexer.close()
    assert s.close(5.0)
    assert s.dropped == {"crystfel_queue_full": 7, "crystfel_closed": 2}  # left waiting at close
    s.put(hit(12), image(12))  # after close: ignored, never blocks
    m = metrics_from([{"actor": "a0", "received": 12, "processed": 12, "results_dropped": dict(s.dropped)}])
    assert m.value("peaknet_results_dropped_total", {"reason": "crystfel_queue_full"}) == 7
    assert m.value("peaknet_results_dropped_total", {"reason": "crystfel_closed"}) == 2


def test_close_stops_a_thread_that_waits_for_hits_and_a_request_without_reply(sink):
    s = sink()
    indexer = Indexer(s.endpoint, s.geometry_path, timeout_ms=200)
    indexer.sock.send(b"next")  # taken by the server, which then waits for a hit
    assert s.close(2.0) and not s._thread.is_alive()
    with pytest.raises(zmq.Again):
        indexer.sock.recv()  # nobody answers once the hand-off has closed
    indexer.close()


def test_geometry_numbers_fill_in_for_frames_without_meta(sink, tmp_path):
    path = tmp_path / "det.geom"
    path.write_text(asic_geometry(SHAPE))  # photon_energy = 9.5 keV, clen = 0.125 (m)
    s = sink(geometry=str(path))
    kv = key_values(s.geometry_path.read_text())
    assert kv["data"] == "detector_data" and kv["peak_list"] == "peak_list" and kv["m1a1/min_ss"] == "24"
    indexer = Indexer(s.endpoint, s.geometry_path)
    s.put(hit(1, meta={}), image(1))
    s.put(hit(2, meta={"photon_energy_ev": 12000.0}), image(2))
    a, b = indexer.request(), indexer.request()
    assert (a["photon_energy_ev"], a["detector_distance_mm"]) == (9500.0, 125.0)
    assert (b["photon_energy_ev"], b["detector_distance_mm"]) == (12000.0, 125.0)
    indexer.close()
    s2 = sink()  # no detector.geometry: the slab placeholder, and NaN for what nothing gives
    indexer = Indexer(s2.endpoint, s2.geometry_path)
    s2.put(hit(3, meta={}), image(3))
    assert math.isnan(indexer.request()["photon_energy_ev"])
    indexer.close()


def test_config_keys_and_registry(tmp_path):
    assert list(SINKS)[0] == "results_stream" and "crystfel" in SINKS  # the stream first: sent right after the tally
    with pytest.raises(ConfigError, match="output.crystfel_endpoint"):
        live_config(tmp_path, crystfel_endpoint="tcp://127.0.0.1:next")
    with pytest.raises(ConfigError, match="output.crystfel_geometry.*set output.crystfel_geometry or output.cxi_dir"):
        config_from_dict({"output": {"crystfel_endpoint": "tcp://127.0.0.1:6000"}}, "<test>")
    with pytest.raises(ConfigError, match="output.crystfel_queue"):
        live_config(tmp_path, crystfel_endpoint="tcp://127.0.0.1:6000", crystfel_queue=0)


# ----------------------------------------------------------------------------------------------
# End to end: a live daemon, its results stream, its CXI files, and an indexer per actor
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_daemon_hands_every_hit_to_the_indexer_with_the_results_streams_peaks(tmp_path):
    in_port, res_port, met_port, live_port = free_port(), free_port(), free_port(), free_port_pair()
    geom = tmp_path / "detector.geom"
    geom.write_text(asic_geometry(tuple(SMALL_SHAPE)))
    cfg = small_config(tmp_path, in_port, res_port, met_port,
                       output={"crystfel_endpoint": f"tcp://127.0.0.1:{live_port}", "crystfel_queue": 1000},
                       detector={"geometry": str(geom)})
    results = Results(res_port)
    daemon = Daemon(cfg, tmp_path)
    indexers: list[Indexer] = []
    try:
        daemon.wait_ready()
        n = 60
        p = producer("bragg", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", str(n),
                     "--rate", "0", "--source", "p0", "--run", "1", "--seed", "3",
                     "--shape", ",".join(map(str, SMALL_SHAPE)))
        got = results.wait_count(n, where=lambda r: r["run"] == 1)
        assert p.wait(timeout=60) == 0, p.stderr.read()
        daemon.wait_event("run_complete", where=lambda e: e["run"] == 1)
        assert len(got) == n
        hits = [r for r in got if r["hit"]]
        assert len(hits) > n // 2  # the simulated frames are mostly hits

        live_geom = tmp_path / "cxi" / "peaknet-live.geom"
        assert key_values(live_geom.read_text())["m1a1/corner_x"] == "97.25"  # the detector's file, rewritten
        assert key_values((tmp_path / "cxi" / "peaknet-detector.geom").read_text())["peak_list"] == "/entry_1/result_1"
        served = []
        for index in (0, 1):  # one indexer per actor, as on a multi-GPU machine
            mine = [r for r in hits if r["worker"].endswith(f"/{index}")]
            indexer = Indexer(f"tcp://127.0.0.1:{live_port + index}", live_geom)
            indexers.append(indexer)
            served += [indexer.request() for _ in mine]
        assert sorted(h["seq"] for h in served) == sorted(r["seq"] for r in hits)

        frames = {}
        for path in (tmp_path / "cxi").glob("*-r1-*.cxi"):
            with h5py.File(path, "r") as f:
                frames.update(zip(f["/entry_1/seq"][:].tolist(), f["/entry_1/data_1/data"][:]))
        by_seq = {r["seq"]: r for r in hits}
        h = SMALL_SHAPE[1]
        for live in served:
            r = by_seq[live["seq"]]
            pk = r["peaks"]
            assert live["source"] == r["source"] and live["run"] == r["run"]
            np.testing.assert_array_equal(live["fs"], np.asarray(pk["x"], np.float64))
            np.testing.assert_array_equal(live["ss"], np.asarray(pk["panel"]) * h + np.asarray(pk["y"]))
            np.testing.assert_array_equal(live["intensity"], np.asarray(pk["intensity"], np.float64))
            np.testing.assert_array_equal(live["image"], frames[live["seq"]].astype(np.float32))
            assert live["photon_energy_ev"] == r["meta"]["photon_energy_ev"]
            assert live["detector_distance_mm"] == r["meta"]["detector_distance_mm"]
        assert not daemon.find("sink_error")
        assert not [e for e in daemon.find("thread_failed") if e.get("role") == "crystfel"]
        m = daemon.metrics()
        assert not any(k.startswith("peaknet_results_dropped_total") and "crystfel" in k and v for k, v in m.items())
    finally:
        for indexer in indexers:
            indexer.close()
        rc = daemon.terminate()
        results.close()
    assert rc == 0, daemon.tail()
