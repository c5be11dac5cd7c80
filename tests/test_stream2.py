"""DECTRIS Stream V2 in (sources/stream2.py) and out (producers/formats/stream2.py).

Messages are built here from the spec (DECTRIS `documentation`, stream_v2/README.md and
cbor/dectris-compression-tag.md) with cbor2; the compressors' output is checked against the
DECTRIS decompressor, so the producer cannot agree with the daemon on a wrong format.
"""

from __future__ import annotations

import datetime as dt
import struct
import threading

import cbor2
import numpy as np
import pytest
import zmq
from dectris.compression import decompress

from harness import SMALL_SHAPE, Daemon, Results, free_port, producer, small_config
from peaknet_daemon.config import ConfigError, SocketConfig, config_from_dict
from peaknet_daemon.ingest import SocketReader
from peaknet_daemon.sources import SourceSpec, make_source
from peaknet_daemon.wire import REASONS, Rejected
from peaknet_producers.formats import make_encoder
from peaknet_producers.formats.stream2 import compress_bslz4, compress_lz4

SHAPE = (2, 8, 8)  # (P, H, W): Stream V2 images are (16, 8)
IMAGE = (16, 8)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
TYPED = {"|u1": 64, "<u2": 69, "<u4": 70, ">u2": 65, "<f4": 85, "<f8": 86}


def channel(image: np.ndarray, compression: str = "none", tag: int | None = None) -> cbor2.CBORTag:
    """tag 40 [[rows, cols], typed array (tag 64-87) of bytes or of tag 56500 [alg, elem, bytes]]."""
    raw = image.tobytes()
    content = raw
    if compression == "bslz4":
        content = cbor2.CBORTag(56500, ["bslz4", image.dtype.itemsize, compress_bslz4(raw, image.dtype.itemsize)])
    elif compression == "lz4":
        content = cbor2.CBORTag(56500, ["lz4", 0, compress_lz4(raw)])
    return cbor2.CBORTag(40, [list(image.shape), cbor2.CBORTag(tag or TYPED[image.dtype.str], content)])


def start_msg(series_id: int = 7, **extra) -> bytes:
    msg = {"type": "start", "series_id": series_id, "series_unique_id": f"u{series_id}",
           "arm_date": dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc), "channels": ["threshold_1", "threshold_2"],
           "image_size_x": IMAGE[1], "image_size_y": IMAGE[0], "number_of_images": 3,
           "incident_energy": 12000.0, "beam_center_x": 4.5, "beam_center_y": 7.25, "pixel_size_x": 75e-6,
           "pixel_size_y": 75e-6, "detector_translation": [0.0, 0.0, 0.15],
           "threshold_energy": {"threshold_1": 6000.0, "threshold_2": 9000.0},
           "goniometer": {"omega": {"start": 0.0, "increment": 0.1}}, "user_data": {"anything": [1, "x"]},
           "jungfraujoch_extra": {"a": cbor2.CBORTag(12345, b"?")}, **extra}
    return cbor2.dumps(msg)


def image_msg(image_id: int, data: dict, series_id: int = 7, **extra) -> bytes:
    return cbor2.dumps({"type": "image", "series_id": series_id, "series_unique_id": f"u{series_id}",
                        "image_id": image_id, "series_date": EPOCH + dt.timedelta(seconds=1000),
                        "start_time": [image_id * 5 + 1, 10], "stop_time": [image_id * 5 + 2, 10],
                        "real_time": [1, 10], "data": data, "spots": [], **extra})


def end_msg(series_id: int = 7) -> bytes:
    return cbor2.dumps({"type": "end", "series_id": series_id, "series_unique_id": f"u{series_id}"})


class Out:
    """A FrameOut keeping copies of what the source committed."""

    def __init__(self, shape=SHAPE, dtype="uint16"):
        self.buffer = np.zeros(shape, dtype)
        self.frames, self.controls = [], []

    def slot(self):
        return self.buffer

    def commit(self, tag):
        self.frames.append((self.buffer.copy(), tag))

    def control(self, event):
        self.controls.append(event)


def source(channel_name: str = "", dtype: str = "uint16", shape=SHAPE):
    cfg = SocketConfig(endpoint="tcp://detector:31001", format="stream2", channel=channel_name)
    return make_source(SourceSpec(cfg, "tcp://detector:31001", shape, dtype))


def frames_of(n: int, dtype=np.uint16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 200, IMAGE).astype(dtype) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Compression: the producer's compressors against DECTRIS's decompressor
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,n", [("u1", 21), ("<u2", 8192 * 3 + 13), ("<u4", 5000), ("<u2", 4096)])
def test_compressors_give_what_the_dectris_decompressor_reads(dtype, n):
    raw = np.random.default_rng(1).integers(0, 300, n).astype(dtype).tobytes()
    elem = np.dtype(dtype).itemsize
    assert decompress(compress_bslz4(raw, elem), "bslz4", elem_size=elem) == raw
    assert decompress(compress_lz4(raw), "lz4") == raw
    if len(raw) > 1000:
        assert len(compress_bslz4(bytes(len(raw)), elem)) < len(raw) // 10  # zeros do compress


# ----------------------------------------------------------------------------------------------
# The source, message by message
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["none", "bslz4", "lz4"])
def test_start_images_end_give_exact_frames_run_count_and_meta(compression):
    src, out = source("threshold_2"), Out()
    t1, t2 = frames_of(3, seed=1), frames_of(3, seed=2)
    src.decode([memoryview(start_msg())], 1.0, out)
    for i in range(3):
        data = {"threshold_1": channel(t1[i], compression), "threshold_2": channel(t2[i], compression)}
        src.decode([memoryview(image_msg(i, data))], 2.0, out)
    src.decode([memoryview(end_msg())], 3.0, out)

    assert [(c.type, c.source, c.run, c.count) for c in out.controls] == [
        ("start", "tcp://detector:31001", 7, 0), ("end", "tcp://detector:31001", 7, 3)]
    assert [tag.seq for _, tag in out.frames] == [0, 1, 2]
    for (array, tag), sent in zip(out.frames, t2):  # the configured channel, as (P, H, W)
        np.testing.assert_array_equal(array, sent.reshape(SHAPE))
        assert tag.run == 7 and tag.source == "tcp://detector:31001" and tag.received_at == 2.0
    assert [tag.timestamp_ns for _, tag in out.frames] == [1000 * 10**9 + (i * 5 + 1) * 10**8 for i in range(3)]
    meta = out.frames[0][1].meta
    assert meta["photon_energy_ev"] == 12000.0 and meta["detector_distance_mm"] == pytest.approx(150.0)
    assert meta["photon_wavelength_a"] == pytest.approx(12398.4198 / 12000.0)
    assert (meta["beam_center_x_px"], meta["beam_center_y_px"]) == (4.5, 7.25)
    assert meta["pixel_size_x_m"] == meta["pixel_size_y_m"] == 75e-6
    assert meta["threshold_energy_ev"] == 9000.0 and meta["series_unique_id"] == "u7"


def test_default_channel_is_the_first_and_wire_types_cast_safely():
    t1, t2 = frames_of(2, seed=3)
    data = {"threshold_1": channel(t1.astype(np.uint8), "bslz4"), "threshold_2": channel(t2)}
    out = Out()
    source().decode([memoryview(image_msg(5, data))], 0.0, out)  # no start seen: no meta, still a frame
    np.testing.assert_array_equal(out.frames[0][0], t1.astype(np.uint8).reshape(SHAPE))
    assert out.frames[0][1].meta == {} and out.frames[0][1].seq == 5

    big_endian = t2.astype(">u2")
    out = Out(dtype="float32")
    source(dtype="float32").decode([memoryview(image_msg(0, {"c": channel(big_endian, "lz4")}))], 0.0, out)
    np.testing.assert_array_equal(out.frames[0][0], t2.reshape(SHAPE).astype(np.float32))


def test_a_series_id_in_end_without_a_start_here_is_no_start_unless_end_carries_the_count():
    src, out = source(), Out()
    with pytest.raises(Rejected) as info:
        src.decode([memoryview(end_msg(9))], 0.0, out)
    assert info.value.reason == "no_start"
    end = cbor2.dumps({"type": "end", "series_id": 9, "number_of_images": 4})
    src.decode([memoryview(end)], 0.0, out)
    assert [(c.type, c.run, c.count) for c in out.controls] == [("end", 9, 4)]


def malformed() -> list[tuple[str, list[bytes]]]:
    good = frames_of(1)[0]
    ok = {"threshold_1": channel(good)}
    comp = compress_bslz4(good.tobytes(), 2)
    bomb = struct.pack(">QI", 1 << 40, 8192) + comp[12:]  # claims a TiB decompressed
    liar = struct.pack(">QI", 2 * good.nbytes, 8192) + comp[12:]  # claims twice the frame

    def compressed(value) -> dict:
        return {"threshold_1": cbor2.CBORTag(40, [list(IMAGE), cbor2.CBORTag(69, cbor2.CBORTag(56500, value))])}

    return [
        ("bad_cbor", [b"\xff\xfe not cbor"]),
        ("bad_cbor", [cbor2.dumps([1, 2, 3])]),
        ("bad_cbor", [b"\xbf\x61a" + b"\x9f" * 1000]),  # nesting beyond the depth limit
        ("bad_cbor", [b"\x9b" + (1 << 62).to_bytes(8, "big")]),  # an array claiming 2**62 items
        ("wrong_parts", [image_msg(0, ok), b"x"]),
        ("unknown_type", [cbor2.dumps({"type": "status"})]),
        ("bad_cbor", [image_msg(0, {})]),
        ("bad_cbor", [cbor2.dumps({"type": "image", "series_id": "seven", "image_id": 0, "data": ok})]),
        ("out_of_range", [image_msg(-1, ok)]),
        ("bad_cbor", [image_msg(0, {"threshold_1": good.tobytes()})]),  # not a tag-40 array
        ("no_channel", [image_msg(0, {"threshold_9": channel(good)})]),
        ("wrong_shape", [image_msg(0, {"threshold_1": channel(good.reshape(8, 16))})]),
        ("wrong_shape", [image_msg(0, {"threshold_1": cbor2.CBORTag(1040, [list(IMAGE), cbor2.CBORTag(69, good.tobytes())])})]),
        ("wrong_dtype", [image_msg(0, {"threshold_1": channel(good.astype(np.uint32))})]),
        ("wrong_dtype", [image_msg(0, {"threshold_1": channel(good.astype(np.float64))})]),
        ("wrong_dtype", [image_msg(0, {"threshold_1": cbor2.CBORTag(40, [list(IMAGE), cbor2.CBORTag(83, b"")])})]),
        ("size_mismatch", [image_msg(0, {"threshold_1": cbor2.CBORTag(40, [list(IMAGE), cbor2.CBORTag(69, good.tobytes()[:-2])])})]),
        ("bad_compression", [image_msg(0, compressed(["zstd-x", 0, comp]))]),
        ("bad_compression", [image_msg(0, compressed(["bslz4", 3, comp]))]),
        ("bad_compression", [image_msg(0, compressed(["bslz4", 2]))]),
        ("bad_compression", [image_msg(0, compressed(["bslz4", 2, comp[:7]]))]),
        ("bad_compression", [image_msg(0, compressed(["bslz4", 2, bomb]))]),
        ("bad_compression", [image_msg(0, compressed(["bslz4", 2, liar]))]),
        ("bad_compression", [image_msg(0, compressed(["bslz4", 2, comp[:12] + b"\x00\x00\x10\x00" + b"\xff" * 64]))]),
        ("bad_compression", [image_msg(0, compressed(["lz4", 0, comp[:12] + b"\x00\x00\x00\x05garbage"]))]),
        ("wrong_shape", [start_msg(image_size_x=9)]),
        ("no_channel", [start_msg(channels=["threshold_3"])]),
        ("no_start", [end_msg(99)]),
    ]


def test_malformed_messages_are_rejected_with_their_reason_counted_and_good_ones_pass(tmp_path):
    """Through a real SocketReader: each bad message is followed by a good image."""
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/s2.sock"
    out, rejects, cond = Out(), [], threading.Condition()

    def on_reject(reason: str, detail: str) -> None:
        with cond:
            rejects.append((reason, detail))
            cond.notify_all()

    class Counting(Out):
        def commit(self, tag):
            with cond:
                super().commit(tag)
                cond.notify_all()

    out = Counting()
    cfg = SocketConfig(endpoint=endpoint, mode="bind", format="stream2", channel="threshold_1",
                       max_message_bytes=1 << 20)
    reader = SocketReader(ctx, cfg, endpoint, SHAPE, "uint16", out, on_reject)
    stop = threading.Event()
    thread = threading.Thread(target=reader.run, args=(stop,))
    thread.start()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    try:
        bad = malformed()
        good = frames_of(len(bad), seed=5)
        for i, (_, parts) in enumerate(bad):
            push.send_multipart(parts)
            push.send(image_msg(i, {"threshold_1": channel(good[i], "bslz4")}))
        with cond:
            assert cond.wait_for(lambda: len(rejects) + len(out.frames) >= 2 * len(bad), 20), (rejects, len(out.frames))
    finally:
        stop.set()
        thread.join()
        push.close(linger=0)
        ctx.term()
    assert [r for r, _ in rejects] == [reason for reason, _ in bad], rejects
    assert all(r in REASONS for r, _ in rejects)
    details = dict(zip(range(len(bad)), (d for _, d in rejects)))
    assert "declares 1099511627776 bytes" in details[21] and "declares 512 bytes" in details[22]
    assert [tag.seq for _, tag in out.frames] == list(range(len(bad)))
    for (array, _), sent in zip(out.frames, good):
        np.testing.assert_array_equal(array, sent.reshape(SHAPE))


def test_channel_is_a_stream2_key():
    with pytest.raises(ConfigError, match="channel"):
        config_from_dict({"ingest": {"sockets": [{"format": "peaknet/1", "channel": "threshold_1"}]}})
    cfg = config_from_dict({"ingest": {"sockets": [{"format": "stream2", "channel": "threshold_2"}]}})
    assert cfg.ingest.sockets[0].channel == "threshold_2"


# ----------------------------------------------------------------------------------------------
# The producer's encoder, read back by the source
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["bslz4", "lz4", "none"])
def test_producer_encoder_round_trips_through_the_source(compression):
    enc, src, out = make_encoder("stream2", compression), source(), Out()
    frames = [f.reshape(SHAPE) for f in frames_of(4, seed=7)]
    messages = [enc.start("p0", 12, {"photon_energy_ev": 9500.0, "detector_distance_mm": 120.0}, frames[0])]
    messages += [enc.frame(f, "p0", i, 12, 10**18 + i, {"k": i}) for i, f in enumerate(frames)]
    messages.append(enc.end("p0", 12, len(frames)))
    for parts in messages:
        src.decode([memoryview(p) for p in parts], 0.0, out)
    assert [(c.type, c.run, c.count) for c in out.controls] == [("start", 12, 0), ("end", 12, 4)]
    assert [(t.seq, t.run, t.timestamp_ns) for _, t in out.frames] == [(i, 12, 10**18 + i) for i in range(4)]
    for (array, tag), sent in zip(out.frames, frames):
        np.testing.assert_array_equal(array, sent)
        assert tag.meta["photon_energy_ev"] == 9500.0 and tag.meta["detector_distance_mm"] == pytest.approx(120.0)
    image = cbor2.loads(messages[1][0])
    content = image["data"]["threshold_1"].value[1].value
    assert (content.tag == 56500 and content.value[0] == compression) if compression != "none" else isinstance(content, bytes)


def test_producer_refuses_a_compression_its_format_lacks():
    p = producer("random", "--format", "peaknet/1", "--compression", "bslz4", "--frames", "1")
    assert p.wait(timeout=60) == 1
    assert "no compression options" in p.stderr.read()
    with pytest.raises(ValueError, match="integer"):
        make_encoder("stream2").start("p0", "run-a", {}, np.zeros(SHAPE, np.uint16))


# ----------------------------------------------------------------------------------------------
# End to end: peaknet-producer --format stream2 -> the daemon -> one result per frame
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_daemon_takes_a_bslz4_stream2_run_from_the_producer(tmp_path):
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    cfg = small_config(tmp_path, in_port, res_port, met_port)
    cfg["ingest"]["sockets"][0].update(format="stream2", channel="threshold_1")
    results = Results(res_port)
    daemon = Daemon(cfg, tmp_path)
    try:
        daemon.wait_ready()
        p = producer("bragg", "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind", "--frames", "40", "--run", "4",
                     "--shape", ",".join(map(str, SMALL_SHAPE)), "--format", "stream2", "--compression", "bslz4",
                     "--pool", "8", "--seed", "2")
        got = results.wait_count(40, where=lambda r: r["run"] == 4)
        assert p.wait(timeout=60) == 0, p.stderr.read()
        done = daemon.wait_event("run_complete", where=lambda e: e["run"] == 4)
        assert done["count"] == 40 and done["processed"] == 40 and done["missing"] == 0
        assert sorted(r["seq"] for r in got) == list(range(40))
        assert {r["source"] for r in got} == {f"tcp://127.0.0.1:{in_port}"}
        assert sum(r["n_peaks"] for r in got) > 40  # simulated Bragg frames arrived intact enough to find peaks
        m = daemon.wait_metric("peaknet_frames_processed_total", lambda v: v >= 40)
        assert m["peaknet_frames_received_total"] == 40
        assert not any(k.startswith("peaknet_frames_rejected_total") and v for k, v in m.items()), m
        assert m["peaknet_control_messages_total"] == 2  # the series' start and end
    finally:
        rc = daemon.terminate()
        results.close()
    assert rc == 0, daemon.tail()
