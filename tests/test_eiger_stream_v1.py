"""EIGER Stream V1 source with hand-built messages (each encoding, header_detail none/basic/all,
malformed messages and their rejection reasons), and the producers' `--format eiger-v1`."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import bitshuffle
import lz4.block
import numpy as np
import pytest
import zmq

from harness import free_port, producer
from peaknet_daemon.config import SocketConfig
from peaknet_daemon.ingest import SocketReader
from peaknet_daemon.sources import SOURCES, ControlEvent, FrameTag, SourceSpec, source_class
from peaknet_daemon.wire import REASONS, Rejected
from peaknet_producers.formats import ENCODERS, encoder_class

pytestmark = pytest.mark.timeout(120)

SHAPE = (2, 16, 24)  # (P, H, W): the EIGER image is 32 rows of 24 pixels
IMAGE = (SHAPE[0] * SHAPE[1], SHAPE[2])
ENDPOINT = "tcp://detector:9999"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Out:
    """A FrameOut that keeps what it is given; slot() is one reused buffer, as in ingest."""

    dtype: str = "uint16"
    frames: list[tuple[np.ndarray, FrameTag]] = field(default_factory=list)
    events: list[ControlEvent] = field(default_factory=list)

    def __post_init__(self):
        self.buf = np.full(SHAPE, 7, self.dtype)
        self.cond = threading.Condition()

    def wait(self, frames: int, timeout: float = 30, events: int = 0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.frames) >= frames and len(self.events) >= events,
                                      timeout), (len(self.frames), self.events)

    def slot(self) -> np.ndarray:
        return self.buf

    def commit(self, tag: FrameTag) -> None:
        with self.cond:
            self.frames.append((self.buf.copy(), tag))
            self.cond.notify_all()

    def control(self, event: ControlEvent) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()


def source(dtype: str = "uint16"):
    return source_class("eiger-v1")(SourceSpec(SocketConfig(format="eiger-v1"), ENDPOINT, SHAPE, dtype))


def feed(src, parts: list, out: Out) -> None:
    src.decode([memoryview(p if isinstance(p, bytes) else bytes(p)) for p in parts], 0.0, out)


def js(**kw) -> bytes:
    return json.dumps(kw).encode()


CONFIG = {"nimages": 3, "ntrigger": 2, "photon_energy": 12400.0, "wavelength": 1.0, "detector_distance": 0.15,
          "beam_center_x": 12.5, "beam_center_y": 16.0, "x_pixel_size": 7.5e-5, "y_pixel_size": 7.5e-5,
          "x_pixels_in_detector": IMAGE[1], "y_pixels_in_detector": IMAGE[0], "software_version": "1.6.0"}


def header(series: int, detail: str, config: dict | None = None) -> list[bytes]:
    parts = [js(htype="dheader-1.0", series=series, header_detail=detail)]
    if detail in ("basic", "all"):
        parts.append(json.dumps(CONFIG if config is None else config).encode())
    if detail == "all":
        for htype, typ in (("dflatfield-1.0", "float32"), ("dpixelmask-1.0", "uint32"),
                           ("dcountrate_table-1.0", "float32")):
            parts += [js(htype=htype, shape=[IMAGE[1], IMAGE[0]], type=typ), b"\0" * 16]
    return parts


def bslz4(image: np.ndarray, prefix: bool = True) -> bytes:
    """Bitshuffle-LZ4 as an EIGER sends it (12-byte prefix, 8 KiB blocks) or as eiger-simulator
    does (the blocks alone, bitshuffle's default block size)."""
    if not prefix:
        return bitshuffle.compress_lz4(image).tobytes()
    block = 8192 // image.dtype.itemsize
    return (image.nbytes.to_bytes(8, "big") + (8192).to_bytes(4, "big")
            + bitshuffle.compress_lz4(image, block).tobytes())


def encode(image: np.ndarray, encoding: str) -> bytes:
    if encoding == "<":
        return image.tobytes()
    if encoding == "lz4<":
        return lz4.block.compress(image.tobytes(), store_size=False)
    return bslz4(image, prefix=not encoding.startswith("sim:"))


def image_msg(series: int, frame: int, blob: bytes, encoding: str, type_: str = "uint16",
              shape: tuple[int, int] = IMAGE, size: int | None = -1, appendix: bool = False, **desc) -> list[bytes]:
    d = {"htype": "dimage_d-1.0", "shape": [shape[1], shape[0]], "type": type_, "encoding": encoding, **desc}
    if size is not None:
        d["size"] = len(blob) if size == -1 else size
    parts = [js(htype="dimage-1.0", series=series, frame=frame, hash=""), json.dumps(d).encode(), blob,
             js(htype="dconfig-1.0", start_time=1, stop_time=2, real_time=1)]
    return parts + [b'{"user": "appendix"}'] if appendix else parts


def test_registered_and_reasons_known():
    assert "eiger-v1" in SOURCES and "eiger-v1" in ENCODERS
    assert {"bad_encoding", "bad_compression"} <= set(REASONS)


def pattern(dtype, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, IMAGE).astype(dtype)


@pytest.mark.parametrize("encoding, wire_type, pipeline", [
    ("<", "uint16", "uint16"), ("lz4<", "uint16", "uint16"), ("bs16-lz4<", "uint16", "uint16"),
    ("sim:bs16-lz4<", "uint16", "uint16"),  # eiger-simulator's framing: no 12-byte prefix
    ("bs16-lz4<", "uint16", "float32"),  # safe cast into the pipeline dtype
    ("bs8-lz4<", "uint8", "uint16"), ("bs32-lz4<", "int32", "int32"), ("lz4<", "int32", "int32"),
])
def test_each_encoding_decodes_into_the_slot(encoding, wire_type, pipeline):
    img = pattern(wire_type)
    wire_encoding = encoding.removeprefix("sim:")
    src, out = source(pipeline), Out(pipeline)
    feed(src, image_msg(4, 9, encode(img, encoding), wire_encoding, wire_type, appendix=encoding == "<"), out)
    assert len(out.frames) == 1 and not out.events
    frame, tag = out.frames[0]
    assert frame.dtype == np.dtype(pipeline)
    np.testing.assert_array_equal(frame.reshape(IMAGE), img.astype(pipeline))
    assert (tag.source, tag.seq, tag.run, tag.meta) == (ENDPOINT, 9, 4, {})


@pytest.mark.parametrize("detail", ["none", "basic", "all"])
def test_header_detail_sets_run_count_and_meta(detail):
    src, out = source(), Out()
    feed(src, header(11, detail), out)
    img = pattern("uint16")
    for i in range(2):
        feed(src, image_msg(11, i, bslz4(img), "bs16-lz4<"), out)
    feed(src, [js(htype="dseries_end-1.0", series=11)], out)
    assert out.events[0] == ControlEvent("start", ENDPOINT, 11)
    metas = [tag.meta for _, tag in out.frames]
    if detail == "none":  # no config: no count, so no end is reported (settled by the next series)
        assert out.events == [ControlEvent("start", ENDPOINT, 11)] and metas == [{}, {}]
        return
    assert out.events[1] == ControlEvent("end", ENDPOINT, 11, 6)  # nimages x ntrigger
    meta = metas[0]
    assert meta["photon_energy_ev"] == 12400.0 and meta["photon_wavelength_a"] == pytest.approx(0.99987, abs=1e-4)
    assert meta["detector_distance_mm"] == pytest.approx(150.0)
    assert (meta["beam_center_x_px"], meta["beam_center_y_px"]) == (12.5, 16.0)
    assert meta["pixel_size_x_m"] == 7.5e-5 and metas[1] == meta


def test_series_state_is_per_series_and_bad_config_values_are_left_out():
    src, out = source(), Out()
    feed(src, header(1, "basic"), out)
    feed(src, header(2, "basic", {"nimages": True, "photon_energy": -5, "wavelength": 2.0,
                                  "detector_distance": "far"}), out)
    img = pattern("uint16")
    feed(src, image_msg(1, 0, img.tobytes(), "<"), out)
    feed(src, image_msg(2, 0, img.tobytes(), "<"), out)
    feed(src, image_msg(3, 0, img.tobytes(), "<"), out)  # a series whose header this reader missed
    assert out.frames[0][1].meta["detector_distance_mm"] == pytest.approx(150.0)
    assert out.frames[1][1].meta == {"photon_energy_ev": pytest.approx(6199.2099),
                                     "photon_wavelength_a": pytest.approx(2.0)}
    assert out.frames[2][1].meta == {}
    feed(src, [js(htype="dseries_end-1.0", series=2)], out)  # nimages was not an int: no count
    feed(src, [js(htype="dseries_end-1.0", series=1)], out)
    assert [e.type for e in out.events] == ["start", "start", "end"] and out.events[-1].count == 6


def test_masked_pixels_at_the_type_maximum_become_zero():
    img = pattern("uint16")
    img[5, :] = 65535  # a module gap
    img[0, 3] = 65534  # a real, very bright pixel stays
    src, out = source("float32"), Out("float32")
    feed(src, image_msg(1, 0, bslz4(img), "bs16-lz4<"), out)
    frame = out.frames[0][0].reshape(IMAGE)
    assert (frame[5] == 0).all() and frame[0, 3] == 65534
    assert np.array_equal(np.delete(frame, 5, 0), np.delete(img, 5, 0).astype(np.float32))


def good_image() -> list[bytes]:
    return image_msg(1, 0, bslz4(pattern("uint16")), "bs16-lz4<")


def replace(parts: list[bytes], i: int, new: bytes) -> list[bytes]:
    return parts[:i] + [new] + parts[i + 1:]


def malformed() -> list[tuple[str, list[bytes]]]:
    img = pattern("uint16")
    raw, blob = img.tobytes(), bslz4(img)
    cut = bytearray(blob)
    cut[12:16] = (10**6).to_bytes(4, "big")  # first block claims more bytes than the message has
    lz = lz4.block.compress(raw, store_size=False)
    return [
        ("bad_encoding", [b"\xff\xfe not json"]),
        ("bad_encoding", replace(good_image(), 1, b"{broken")),
        ("bad_header", [b"[1, 2]"]),
        ("bad_header", [js(series=1)]),
        ("unknown_type", [js(htype="dstatus-1.0")]),
        ("unknown_proto", [js(htype="dimage-2.0", series=1, frame=0)]),
        ("wrong_parts", good_image()[:3]),
        ("wrong_parts", good_image() + [b"x", b"y"]),
        ("wrong_parts", header(1, "all")[:5]),
        ("wrong_parts", header(1, "none") + [b"{}", b"{}"]),
        ("wrong_parts", [js(htype="dseries_end-1.0", series=1), b"x", b"y"]),
        ("bad_header", header(1, "most")),
        ("bad_header", replace(header(1, "all"), 4, js(htype="dflatfield-1.0"))),
        ("bad_header", replace(good_image(), 1, js(htype="dimage-1.0"))),
        ("bad_header", replace(good_image(), 3, js(htype="dconfig-9"))),
        ("bad_header", [js(htype="dimage-1.0", series="one", frame=0)] + good_image()[1:]),
        ("bad_header", [js(htype="dseries_end-1.0", series=True)]),
        ("out_of_range", [js(htype="dimage-1.0", series=1, frame=-1)] + good_image()[1:]),
        ("out_of_range", [js(htype="dheader-1.0", series=2**63, header_detail="none")]),
        ("oversize", [b" " * ((1 << 20) + 1)]),
        ("wrong_shape", image_msg(1, 0, blob, "bs16-lz4<", shape=(IMAGE[1], IMAGE[0]))),  # transposed
        ("wrong_shape", image_msg(1, 0, blob, "bs16-lz4<", shape=(IMAGE[0] + 16, IMAGE[1]))),  # 3 panels
        ("wrong_shape", replace(good_image(), 1, js(htype="dimage_d-1.0", shape=[24], type="uint16",
                                                    encoding="<"))),
        ("wrong_shape", replace(good_image(), 1, js(htype="dimage_d-1.0", shape=[24, 0], type="uint16",
                                                    encoding="<"))),
        ("wrong_dtype", image_msg(1, 0, blob, "bs16-lz4<", type_="float64")),
        ("wrong_dtype", image_msg(1, 0, bslz4(pattern("uint32")), "bs32-lz4<", type_="uint32")),
        ("bad_compression", image_msg(1, 0, raw, "bs16-lz4>")),
        ("bad_compression", image_msg(1, 0, raw, "zstd<")),
        ("bad_compression", image_msg(1, 0, blob, "bs32-lz4<")),  # 32-bit shuffle of 16-bit pixels
        ("bad_compression", image_msg(1, 0, bytes(cut), "bs16-lz4<")),
        ("bad_compression", image_msg(1, 0, blob[:-7], "bs16-lz4<")),
        ("bad_compression", image_msg(1, 0, b"", "bs16-lz4<")),
        ("bad_compression", image_msg(1, 0, lz[:len(lz) // 2], "lz4<")),
        ("bad_compression", image_msg(1, 0, lz4.block.compress(raw[:-2], store_size=False), "lz4<")),
        ("size_mismatch", image_msg(1, 0, raw[:-2], "<")),
        ("size_mismatch", image_msg(1, 0, blob, "bs16-lz4<", size=len(blob) + 1)),
    ]


@pytest.mark.parametrize("reason, parts", malformed(), ids=[f"{i}-{r}" for i, (r, _) in enumerate(malformed())])
def test_malformed_messages_are_rejected_with_their_reason(reason, parts):
    src, out = source(), Out()
    feed(src, header(1, "basic"), out)
    with pytest.raises(Rejected) as info:
        feed(src, parts, out)
    assert info.value.reason == reason, info.value
    assert not out.frames and len(out.events) == 1  # nothing committed, no control event


def test_corrupted_bitshuffle_bytes_never_crash_and_never_pass_silently():
    """Random byte flips inside the blocks: each message decodes (LZ4 can absorb a flip in a
    literal) or is rejected as bad_compression; the process survives every one."""
    img = pattern("uint16")
    blob = bslz4(img)
    rng = np.random.default_rng(1)
    reasons = set()
    for _ in range(300):
        b = bytearray(blob)
        for pos in rng.integers(12, len(b), int(rng.integers(1, 4))):
            b[pos] = int(rng.integers(0, 256))
        src, out = source(), Out()
        try:
            feed(src, image_msg(1, 0, bytes(b), "bs16-lz4<"), out)
        except Rejected as rej:
            reasons.add(rej.reason)
    assert reasons == {"bad_compression"}


def test_big_image_is_bounded_before_decompression():
    """A header that claims a huge image is refused on its shape: nothing is allocated for it."""
    src, out = source(), Out()
    blob = lz4.block.compress(b"\0" * 1024, store_size=False)
    with pytest.raises(Rejected) as info:
        feed(src, image_msg(1, 0, blob, "lz4<", shape=(100_000, 100_000)), out)
    assert info.value.reason == "wrong_shape"


# ---------------------------------------------------------------------------------------------
# Producers: --format eiger-v1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["bslz4", "lz4", "none"])
def test_encoder_round_trip(compression):
    enc = encoder_class("eiger-v1")(compression)
    frame = np.random.default_rng(2).integers(0, 4000, SHAPE).astype(np.uint16)
    src, out = source(), Out()
    meta = {"photon_energy_ev": 9500.0, "detector_distance_mm": 120.0}
    for parts in (enc.start("p0", 5, meta, frame), enc.frame(frame, "p0", 0, 5, 123, {"hit": True}),
                  enc.frame(frame[::-1].copy(), "p0", 1, 5, None, {}), enc.end("p0", 5, 2)):
        feed(src, parts, out)
    assert [t.seq for _, t in out.frames] == [0, 1]
    np.testing.assert_array_equal(out.frames[0][0], frame)
    np.testing.assert_array_equal(out.frames[1][0], frame[::-1])
    assert out.frames[0][1].meta["photon_energy_ev"] == 9500.0
    assert out.frames[0][1].meta["detector_distance_mm"] == pytest.approx(120.0)
    desc = json.loads(enc.frame(frame, "p0", 0, 5, 1, {})[1])
    assert desc["encoding"] == {"bslz4": "bs16-lz4<", "lz4": "lz4<", "none": "<"}[compression]
    assert desc["shape"] == [SHAPE[2], SHAPE[0] * SHAPE[1]]
    assert [e.type for e in out.events] == ["start"]  # the producer's header has no image count


def test_encoder_refuses_what_eiger_v1_cannot_carry():
    from peaknet_producers.errors import ProducerError
    enc = encoder_class("eiger-v1")()
    with pytest.raises(ProducerError, match="integer run"):
        enc.start("p0", "run-a", {}, np.zeros(SHAPE, np.uint16))
    with pytest.raises(ProducerError, match="not float16"):
        enc.frame(np.zeros(SHAPE, np.float16), "p0", 0, 1, None, {})
    with pytest.raises(ValueError):
        encoder_class("eiger-v1")("zstd")


def collect(port: int, dtype: str, out: Out, rejects: list) -> SocketReader:
    sock = SocketConfig(endpoint=f"tcp://127.0.0.1:{port}", mode="connect", format="eiger-v1")
    return SocketReader(zmq.Context.instance(), sock, sock.endpoint, SHAPE, dtype, out,
                        lambda reason, detail: rejects.append((reason, detail)))


@pytest.mark.parametrize("kind", ["random", "bragg", "replay"])
def test_producer_cli_sends_eiger_v1_from_every_frame_source(kind, tmp_path):
    """`peaknet-producer KIND --format eiger-v1` into a SocketReader with the eiger-v1 source:
    every frame arrives, bit-identical where the frames are known (replay of a recording)."""
    port = free_port()
    shape = ",".join(map(str, SHAPE))
    args = {"random": ["random", "--shape", shape, "--dtype", "uint16"],
            "bragg": ["bragg", "--shape", shape],
            "replay": ["replay", str(tmp_path / "rec.npy")]}[kind]
    if kind == "replay":
        rec = np.random.default_rng(5).integers(0, 60000, (4, *SHAPE)).astype(np.uint16)
        np.save(tmp_path / "rec.npy", rec)
    stop, out, rejects = threading.Event(), Out(), []
    reader = collect(port, "uint16", out, rejects)
    thread = threading.Thread(target=reader.run, args=(stop,), daemon=True)
    thread.start()
    try:
        p = producer(*args, "--endpoint", f"tcp://127.0.0.1:{port}", "--bind", "--frames", "4",
                     "--run", "7", "--format", "eiger-v1", "--no-progress")
        stdout, stderr = p.communicate(timeout=90)
        assert p.returncode == 0, stderr
        out.wait(4, events=2)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not rejects
    assert [t.seq for _, t in out.frames] == [0, 1, 2, 3] and {t.run for _, t in out.frames} == {7}
    # the header announces the frames the producer was asked for, so the series end settles the run
    assert [(e.type, e.count) for e in out.events] == [("start", 0), ("end", 4)]
    if kind == "replay":
        expect = np.where(rec == 65535, 0, rec)
        for i, (frame, _) in enumerate(out.frames):
            np.testing.assert_array_equal(frame, expect[i])
