"""The live monitor's parts without a daemon: the actor-side sampler (rate limit, bounds), the
supervisor-side state (totals, series, histogram, virtual powder, latest hits, reset, bounds,
threads), the PNG writer, the WSGI app and its mount on the metrics server, the vendored chart
library, the configs; and the worker's glue with one in-process worker."""

from __future__ import annotations

import json
import re
import struct
import threading
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from peaknet_daemon.config import MonitorConfig, config_from_dict, load_config
from peaknet_daemon.metrics import Metrics
from peaknet_daemon.monitor import HitSampler, MonitorState, gpu_readings, monitor_app
from peaknet_daemon.monitor import state as state_mod
from peaknet_daemon.monitor.images import encode_png, grid, tile, tile_positions
from peaknet_daemon.monitor.sampler import block_max

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "daemon" / "monitor" / "static"
SHAPE = (4, 16, 12)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def result(seq, n_peaks, run=1, hit_threshold=3, panel=None, y=None, x=None, source="s"):
    panel = np.zeros(n_peaks, np.int16) if panel is None else np.asarray(panel, np.int16)
    y = np.full(n_peaks, 5.0, np.float32) if y is None else np.asarray(y, np.float32)
    x = np.full(n_peaks, 7.0, np.float32) if x is None else np.asarray(x, np.float32)
    return {"source": source, "seq": seq, "run": run, "n_peaks": n_peaks, "hit": n_peaks >= hit_threshold,
            "latency_ms": 10.0 + seq, "peaks": {"panel": panel, "y": y, "x": x,
                                                 "intensity": np.ones(n_peaks, np.float32),
                                                 "npix": np.ones(n_peaks, np.int32)},
            "worker": "h/0", "meta": {}}


def summary(seq, n_peaks, t, run=1, **kw):
    r = result(seq, n_peaks, run=run, **kw)
    return {**{k: r[k] for k in ("source", "seq", "run", "n_peaks", "hit", "latency_ms")},
            "panel": r["peaks"]["panel"], "y": r["peaks"]["y"], "x": r["peaks"]["x"], "t": t}


# ---------------------------------------------------------------------------------- sampler
def test_sampler_keeps_hit_frames_within_the_rate_limit():
    clock = Clock()
    s = HitSampler(MonitorConfig(max_hits_per_s=2.0, latest_hits=8), hit_threshold=3, clock=clock)
    frame = np.ones(SHAPE, np.uint16)
    copied = 0
    for seq in range(50):  # one burst: wants_frame lets at most the bucket (2) be copied
        wanted = s.wants_frame(5)
        copied += wanted
        s.offer(result(seq, 5), frame if wanted else None)
    assert copied == 2
    out = s.drain()
    assert len(out["results"]) == 50 and len(out["hits"]) == 2 and out["dropped"] == 0
    assert [h[0]["seq"] for h in out["hits"]] == [0, 1]

    # Frames copied for the CXI writer anyway (no wants_frame) still pass the same limit.
    clock.t += 1.0
    for seq in range(50, 60):
        s.offer(result(seq, 5), frame)
    assert len(s.drain()["hits"]) == 2
    # No hit, no frame; and nothing is kept twice.
    clock.t += 10
    assert not s.wants_frame(2)
    s.offer(result(70, 2), frame)
    out = s.drain()
    assert out["hits"] == [] and len(out["results"]) == 1
    assert s.drain() == {"results": [], "hits": [], "dropped": 0}


def test_sampler_is_bounded_and_counts_what_it_drops():
    s = HitSampler(MonitorConfig(max_results_per_poll=100, latest_hits=3, max_hits_per_s=100), 3, clock=Clock())
    for seq in range(150):
        s.offer(result(seq, 4), np.full(SHAPE, seq, np.uint16))
    out = s.drain()
    assert len(out["results"]) == 100 and out["dropped"] == 50
    assert [r["seq"] for r in out["results"]] == list(range(50, 150))
    # The clock stands still: the bucket's 100 tokens went to frames 0-99, of which the last K stay.
    assert [h[0]["seq"] for h in out["hits"]] == [97, 98, 99]
    assert "intensity" not in out["results"][0] and "meta" not in out["results"][0]


def test_sampler_with_rate_zero_sends_no_frames():
    s = HitSampler(MonitorConfig(max_hits_per_s=0.0), 3, clock=Clock())
    assert not s.wants_frame(10)
    s.offer(result(0, 10), np.ones(SHAPE))
    assert s.drain()["hits"] == []


def test_block_max_keeps_single_bright_pixels():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 5, size=(2, 10, 7)).astype(np.uint16)
    frame[1, 9, 6] = 1000
    small = block_max(frame, 4)
    assert small.shape == (2, 3, 2)
    assert small[1, 2, 1] == 1000
    for p in range(2):
        for i in range(3):
            for j in range(2):
                assert small[p, i, j] == frame[p, 4 * i:4 * i + 4, 4 * j:4 * j + 4].max()
    np.testing.assert_array_equal(block_max(frame, 1), frame)


# ---------------------------------------------------------------------------------- state
def make_state(clock, **cfg) -> MonitorState:
    cfg = {"downsample": 4, "latest_hits": 2, "history_s": 60.0, **cfg}
    return MonitorState(MonitorConfig(enabled=True, **cfg), SHAPE, hit_threshold=3, interval_s=1.0, clock=clock)


def test_state_totals_histogram_and_virtual_powder_in_slab_layout():
    clock = Clock(1000.0)
    st = make_state(clock)
    st.add_results([summary(0, 0, 990.2), summary(1, 3, 990.5, panel=[0, 2, 3], y=[0.0, 5.2, 15.4], x=[0, 11.0, 3.6]),
                    summary(2, 5, 991.1, panel=[1] * 5, y=[8.0] * 5, x=[4.0] * 5),
                    summary(3, 1, 991.9, panel=[9], y=[1], x=[1])])  # panel 9 does not exist
    snap = st.snapshot()
    assert snap["totals"] == {"frames": 4, "hits": 2, "peaks": 9, "missing": 0, "dropped": 0,
                              "bad_peaks": 1, "bad_hits": 0, "errors": 0}
    assert snap["current_run"] == "1"
    assert snap["histogram"]["counts"] == [1, 1, 0, 1, 0, 1]
    powder = st.powder()
    assert powder.shape == (4 * 4, 3)  # (P * ceil(16/4), ceil(12/4)): panels stacked along y
    expected = np.zeros((16, 3), np.int64)
    expected[0 * 4 + 0, 0] += 1        # panel 0, y 0, x 0
    expected[2 * 4 + 1, 2] += 1        # panel 2, y 5.2 -> pixel 5 -> bin 1; x 11 -> bin 2
    expected[3 * 4 + 3, 1] += 1        # panel 3, y 15.4 -> 15 -> 3; x 3.6 -> 4 -> 1
    expected[1 * 4 + 2, 1] += 5        # panel 1, y 8 -> 2, x 4 -> 1
    np.testing.assert_array_equal(powder, expected)
    assert snap["powder"]["peaks"] == 8
    rows, cols = grid(4)
    assert (snap["powder"]["height"], snap["powder"]["width"]) == (rows * 4, cols * 3)


def test_state_series_per_run_per_second_and_bounded_history():
    clock = Clock(1000.0)
    st = make_state(clock, history_s=60.0)
    st.add_results([summary(i, 4 if i % 2 else 0, 990 + i / 4, run=7) for i in range(12)])  # 990.00 .. 992.75
    st.add_results([summary(100, 5, 993.5, run=8)])
    series = st.snapshot()["series"]
    t = series["t"]
    assert t[-1] == 1000 - 3 and t[0] <= 989  # complete seconds only (interval 1 s + 1 s)
    fps = dict(zip(t, series["runs"]["7"]["fps"]))
    pct = dict(zip(t, series["runs"]["7"]["hit_pct"]))
    assert (fps[990], fps[991], fps[992], fps[993]) == (4, 4, 4, None)
    assert pct[990] == 50.0 and pct[989] is None
    assert dict(zip(t, series["runs"]["8"]["fps"]))[993] == 1
    assert [r["run"] for r in st.snapshot()["runs"]] == [8, 7]  # newest first

    clock.t = 2000.0  # an hour later: the old seconds are forgotten when new data comes
    st.add_results([summary(200, 1, 1999.0, run=9)])
    assert all(not r.seconds or min(r.seconds) >= 2000 - 61 for r in st._runs.values())
    assert set(st.snapshot()["series"]["runs"]) == {"9"}


def test_state_keeps_at_most_max_runs_and_latest_hits():
    clock = Clock()
    st = make_state(clock, latest_hits=2)
    for run in range(state_mod.MAX_RUNS + 3):
        st.add_results([summary(run, 3, 900.0 + run, run=run)])
    runs = [r["run"] for r in st.snapshot()["runs"]]
    assert len(runs) == state_mod.MAX_RUNS and runs[0] == state_mod.MAX_RUNS + 2 and 0 not in runs
    small = (4, 4, 3)
    for seq in range(5):
        st.add_hit(summary(seq, 3, 950.0 + seq), np.full(small, seq, np.float32))
    st.add_hit(summary(9, 3, 940.0), np.zeros(small, np.float32))  # older than the kept ones
    st.add_hit(summary(10, 3, 960.0), np.zeros((4, 16, 12), np.float32))  # not downsampled: refused
    hits = st.snapshot()["hits"]
    assert [h["seq"] for h in hits] == [4, 3]
    assert st.snapshot()["totals"]["bad_hits"] == 1
    assert st.hit_png(hits[0]["id"]).startswith(b"\x89PNG")
    assert st.hit_png(1) is None  # pushed out


def test_hit_peaks_are_placed_on_the_tiled_image():
    st = make_state(Clock())
    st.add_hit(summary(0, 2, 1.0, panel=[0, 3], y=[0.0, 15.0], x=[0.0, 11.0]), np.zeros((4, 4, 3), np.float32))
    hit = st.snapshot()["hits"][0]
    # grid(4) = 2 x 2 tiles of 4 x 3: panel 3 is the bottom-right tile.
    assert (hit["height"], hit["width"]) == (8, 6)
    # Pixel centres: detector pixel y sits at (y + 0.5) / 4 - 0.5 of its tile (sent to 0.01 px).
    np.testing.assert_allclose(hit["rows"], [-0.375, 4 + 3.375], atol=0.006)
    np.testing.assert_allclose(hit["cols"], [-0.375, 3 + 2.375], atol=0.006)


def test_reset_forgets_the_accumulated_views():
    clock = Clock()
    st = make_state(clock)
    st.add_results([summary(0, 5, 990.0)])
    st.add_hit(summary(0, 5, 990.0), np.ones((4, 4, 3), np.float32))
    st.reset()
    snap = st.snapshot()
    assert snap["epoch"] == 1 and snap["runs"] == [] and snap["hits"] == [] and snap["powder"] is None
    assert snap["totals"]["frames"] == 0 and snap["histogram"]["counts"] == []
    assert st.powder_png() is None


def test_actor_figures_from_the_stats_polls():
    clock = Clock(100.0)
    st = make_state(clock)
    st.update([{"actor": "h/0", "processed": 10, "received": 12, "rejected": {"bad_header": 2},
                "latencies_s": [0.01] * 98 + [0.5, 0.5]}], missing_total=3)
    clock.t = 102.0
    side = {"results": [summary(0, 4, 101.0)], "hits": [], "dropped": 7}
    st.update([{"actor": "h/0", "processed": 30, "received": 32, "rejected": {"bad_header": 2},
                "latencies_s": [0.02, 0.04], "monitor": side}], missing_total=5,
              gpus=[{"gpu": "0", "utilization_percent": 87.0}])
    snap = st.snapshot()
    (a,) = snap["actors"]
    assert a["name"] == "h/0" and a["rate_fps"] == pytest.approx(10.0)
    assert a["p50_ms"] == pytest.approx(30.0) and a["p99_ms"] == pytest.approx(39.8)
    assert a["rejected"] == {"bad_header": 2} and a["dropped"] == 7
    assert snap["totals"]["missing"] == 5 and snap["totals"]["dropped"] == 7 and snap["totals"]["frames"] == 1
    assert snap["gpus"] == [{"gpu": "0", "utilization_percent": 87.0}]


def test_gpu_readings_come_from_the_metrics_gauges():
    m = Metrics()
    m.gpu_utilization.labels("1").set(40)
    m.gpu_utilization.labels("0").set(90)
    m.gpu_temperature.labels("0").set(55)
    assert gpu_readings(m.registry) == [{"gpu": "0", "utilization_percent": 90.0, "temperature_celsius": 55.0},
                                        {"gpu": "1", "utilization_percent": 40.0}]


@pytest.mark.timeout(60)
def test_state_is_thread_safe_under_concurrent_feeding_and_reading():
    st = make_state(Clock(1000.0), latest_hits=4)
    errors: list[BaseException] = []

    def feed(k):
        try:
            for i in range(200):
                st.add_results([summary(k * 1000 + i, 4, 990.0 + i / 100, panel=[0, 1, 2, 3], y=[1, 2, 3, 4],
                                        x=[1, 2, 3, 4])])
                st.add_hit(summary(k * 1000 + i, 4, 990.0 + i / 100), np.ones((4, 4, 3), np.float32))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def read():
        try:
            for _ in range(100):
                snap = st.snapshot()
                json.dumps(snap)
                for h in snap["hits"]:
                    st.hit_png(h["id"])
                st.powder_png()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(3)] + [threading.Thread(target=read)
                                                                              for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    snap = st.snapshot()
    assert snap["totals"]["frames"] == 600 and snap["totals"]["peaks"] == 2400
    assert int(st.powder().sum()) == 2400 and len(snap["hits"]) == 4


# ---------------------------------------------------------------------------------- images
def decode_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader for what encode_png writes (8-bit gray/RGB, filter 0), checking CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour, *_ = header
    channels = {0: 1, 2: 3}[colour]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    assert depth == 8 and (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape((h, w, channels) if channels == 3 else (h, w))


def test_png_round_trip_gray_and_rgb():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(gray)), gray)
    np.testing.assert_array_equal(decode_png(encode_png(rgb)), rgb)
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2, 4), np.uint8))


def test_tiling_puts_panel_p_at_row_p_div_cols():
    stack = np.arange(5)[:, None, None] * np.ones((5, 2, 3))
    assert grid(5) == (2, 3) and grid(16) == (4, 4) and grid(1) == (1, 1)
    img = tile(stack, fill=-1)
    assert img.shape == (4, 9)
    assert img[0, 0] == 0 and img[0, 3] == 1 and img[2, 0] == 3 and img[2, 3] == 4 and img[2, 6] == -1
    r, c = tile_positions(np.array([4]), np.array([1.0]), np.array([2.0]), 5, 2, 3, factor=1)
    assert (r[0], c[0]) == (3.0, 5.0)


# ---------------------------------------------------------------------------------- HTTP
def call(app, path, method="GET", query=""):
    status, headers = {}, {}

    def start_response(s, h):
        status["s"] = s
        headers.update(h)
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": query,
                         "wsgi.input": BytesIO(b"")}, start_response))
    return status["s"], headers, body


def test_monitor_app_routes_and_mount_on_the_metrics_server():
    st = make_state(Clock())
    st.add_results([summary(0, 3, 990.0)])
    st.add_hit(summary(0, 3, 990.0), np.ones((4, 4, 3), np.float32))
    m = Metrics()
    m.mount("/monitor", monitor_app(st))
    app = m.wsgi_app()

    status, headers, _ = call(app, "/monitor")
    assert status.startswith("302") and headers["Location"] == "/monitor/"
    status, headers, page = call(app, "/monitor/")
    assert status.startswith("200") and b"static/uPlot.iife.min.js" in page and b"static/monitor.js" in page
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page), "the page must load nothing from elsewhere"
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "monitor.js", "monitor.css", "uPlot.LICENSE"):
        status, _, body = call(app, f"/monitor/static/{name}")
        assert status.startswith("200") and body == (STATIC / name).read_bytes()
    assert call(app, "/monitor/static/../app.py")[0].startswith("404")
    assert call(app, "/monitor/static/VENDORED.md")[0].startswith("404")

    status, headers, body = call(app, "/monitor/state.json")
    snap = json.loads(body)
    assert headers["Content-Type"] == "application/json" and snap["totals"]["frames"] == 1
    status, headers, png = call(app, f"/monitor/hit/{snap['hits'][0]['id']}.png")
    assert headers["Content-Type"] == "image/png" and decode_png(png).shape == (8, 6)
    assert decode_png(call(app, "/monitor/powder.png", query="run=1")[2]).shape == (8, 6, 3)
    assert call(app, "/monitor/powder.png", query="run=99")[0].startswith("404")
    assert call(app, "/monitor/hit/999.png")[0].startswith("404")

    assert call(app, "/monitor/reset")[0].startswith("405")
    assert call(app, "/monitor/reset", method="POST")[0].startswith("200")
    assert json.loads(call(app, "/monitor/state.json")[2])["totals"]["frames"] == 0
    assert call(app, "/metrics")[0].startswith("200") and call(app, "/monitorx")[0].startswith("404")
    assert call(Metrics().wsgi_app(), "/monitor/")[0].startswith("404")  # not mounted: not served


def test_uplot_is_vendored_at_the_pinned_version_with_its_licence():
    vendored = (STATIC / "VENDORED.md").read_text()
    version = re.search(r"\| (\d+\.\d+\.\d+) \(tarball", vendored).group(1)
    head = (STATIC / "uPlot.iife.min.js").read_text()[:200]
    assert f"(v{version})" in head
    licence = (STATIC / "uPlot.LICENSE").read_text()
    assert licence.startswith("The MIT License") and "Leon Sorokin" in licence


# ---------------------------------------------------------------------------------- config
def test_monitor_config_defaults_and_shipped_configs():
    assert config_from_dict({}).monitor.enabled is False
    assert load_config(ROOT / "configs" / "demo-cpu.yaml").monitor.enabled is False
    beamline = load_config(ROOT / "configs" / "beamline-gpu.yaml")
    assert beamline.monitor.enabled and beamline.metrics.enabled and beamline.metrics.interval_s <= 1.0
    with pytest.raises(ValueError, match="monitor.refresh_s"):
        config_from_dict({"monitor": {"refresh_s": 5}})
    with pytest.raises(ValueError, match="needs metrics.enabled"):
        config_from_dict({"monitor": {"enabled": True}, "metrics": {"enabled": False}})


def test_a_broken_side_channel_is_counted_not_fatal():
    st = make_state(Clock())
    st.update([{"actor": "h/0", "processed": 1, "monitor": {"results": [{"run": 1}], "hits": [], "dropped": 2}},
               {"actor": "h/1", "processed": 1, "monitor": {"results": [summary(0, 3, 990.0)], "hits": "garbage"}}])
    snap = st.snapshot()
    assert snap["totals"]["errors"] == 2 and snap["totals"]["frames"] == 1 and snap["totals"]["dropped"] == 2
    assert [a["dropped"] for a in snap["actors"]] == [2, 0]
    assert {a["name"] for a in snap["actors"]} == {"h/0", "h/1"}


# ---------------------------------------------------------------------------------- worker glue
@pytest.mark.timeout(120)
def test_worker_offers_summaries_and_rate_limited_hit_frames(tmp_path):
    import zmq

    from harness import Results, free_port
    from peaknet_daemon.wire import encode_frame
    from peaknet_daemon.worker import Worker
    from peaknet_producers.bragg import BraggConfig, BraggSimulator

    shape, n = (2, 64, 64), 24
    sim = BraggSimulator(BraggConfig(shape=shape, dtype="uint16"), seed=11)
    frames = [sim.simulate(i).data for i in range(n)]
    port = free_port()
    results = Results(port)
    cfg = config_from_dict({
        "model": {"preset": "classical", "classical": {"snr_threshold": 6.0, "min_pixels": 2}},
        "pipeline": {"frame_shape": list(shape), "dtype": "uint16", "batch_size": 4, "max_batch_delay_ms": 10,
                     "buffers": 2, "device": "cpu"},
        "ingest": {"sockets": [{"endpoint": f"ipc://{tmp_path}/in.ipc", "mode": "bind"}]},
        "output": {"results_endpoint": f"tcp://127.0.0.1:{port}", "hit_threshold": 1, "cxi_dir": ""},
        "monitor": {"enabled": True, "max_hits_per_s": 1.0, "latest_hits": 3, "downsample": 4},
    }, "<test_monitor>")
    worker = Worker(cfg)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(worker.endpoints[0])
    try:
        for i, frame in enumerate(frames):
            push.send_multipart(encode_frame(frame, "det", i, run=3))
        got = results.wait_count(n, timeout=60)
        final = worker.stop()
    finally:
        push.close(linger=0)
        ctx.term()
        results.close()
    side = final["monitor"]
    assert len(got) == n and final["processed"] == n
    by_seq = {r["seq"]: r for r in got}
    assert sorted(s["seq"] for s in side["results"]) == list(range(n)) and side["dropped"] == 0
    for s in side["results"]:
        assert s["n_peaks"] == by_seq[s["seq"]]["n_peaks"] and s["hit"] == by_seq[s["seq"]]["hit"]
        np.testing.assert_array_equal(s["x"], by_seq[s["seq"]]["peaks"]["x"])
    hits = side["hits"]
    assert 1 <= len(hits) <= 3  # a bucket of one frame, refilled at 1/s while 24 frames ran
    for s, image in hits:
        assert s["hit"] and image.shape == (2, 16, 16)
        np.testing.assert_array_equal(image, block_max(frames[s["seq"]], 4))


def test_gray_scale_is_not_set_by_a_few_hot_pixels():
    from peaknet_daemon.monitor.images import to_gray
    image = np.random.default_rng(0).poisson(1.0, (200, 200)).astype(np.float32)
    image[np.arange(10) * 7, 3] = 60000.0  # hot pixels
    image[50, 50:53] = 30.0  # a peak
    gray = to_gray(image)
    assert gray[0, 3] == 255 and gray[50, 51] == 255 and np.median(gray) == 0
    assert not to_gray(np.zeros((3, 3))).any()
