"""DECTRIS Stream V2: one CBOR map per message (`start`, `image`, `end`), as EIGER2 detectors
(SIMPLON `stream/config` format `cbor`, port 31001) and Jungfraujoch send it.

Spec: DECTRIS's `documentation` repository, `stream_v2/README.md` and `cbor/dectris-compression-tag.md`.
An image's channel is a tag-40 multi-dimensional array `[[rows, columns], typed array]`; the
typed array (RFC 8746, tags 64-87) holds a byte string, raw or wrapped in the DECTRIS
compression tag 56500 `[algorithm, element size, compressed bytes]` (`bslz4`, `lz4`, both with
HDF5 framing: an 8-byte big-endian decompressed size first).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import cbor2
import numpy as np
from dectris.compression import decompress

from ..wire import DTYPES, HC_EV_ANGSTROM, INT64_MAX, MAX_META_STR, Rejected, check_meta, check_uint
from .base import ControlEvent, FrameOut, FrameTag, SourceSpec

MULTI_DIM = 40  # RFC 8746 multi-dimensional array, row-major
MULTI_DIM_COLUMN_MAJOR = 1040
COMPRESSED = 56500  # DECTRIS compression tag
# RFC 8746 section 2.1: typed-array tag -> numpy dtype (76 is reserved; 68 is uint8 "clamped").
TYPED_ARRAYS = {
    64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
    72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
    80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
}
ALGORITHMS = ("bslz4", "lz4")
SERIES_KEPT = 16  # series whose start metadata a reader remembers (images of older ones get none)
MAX_DEPTH = 32  # CBOR nesting: Stream V2 needs 5; flatfields and goniometer maps a few more


@dataclass
class _Series:
    meta: dict[str, Any]
    count: int | None  # number_of_images from start


class Stream2Source:
    """Start messages open a run (series_id) and give its metadata; each image's configured
    channel becomes one frame (seq = image_id); end closes the run.

    Copies: cbor2 materialises the message (and the data's byte string) once; compressed data is
    then decompressed into a new buffer (`dectris.compression.decompress` has no output-buffer
    argument) and copied, with a safe cast where the wire type differs, into the batch slot: one
    copy after decompression. The decompressed size is read from the HDF5 framing and checked
    against the frame's size before anything is allocated for it.

    Source: the configured endpoint, the same for every reader of this stream, so that the runs
    of one detector merge across the ingest processes and actors that share its messages (PUSH
    deals them round-robin). Per-run metadata (from `start`) reaches the frames a reader decodes
    only when that reader received the series' `start`.
    """

    def __init__(self, spec: SourceSpec):
        p, h, w = spec.frame_shape
        self.image_shape = (p * h, w)
        self.dtype = np.dtype(DTYPES[spec.dtype])
        self.frame_bytes = p * h * w
        self.channel: str = spec.socket.channel
        self.source = spec.socket.endpoint
        self._series: OrderedDict[int, _Series] = OrderedDict()

    def decode(self, parts: Sequence[memoryview], received_at: float, out: FrameOut) -> None:
        if len(parts) != 1:
            raise Rejected("wrong_parts", f"Stream V2 message has {len(parts)} parts, expected 1")
        # bytes(): cbor2 converts other buffers far more slowly than it reads bytes. No tag hook:
        # cbor2 leaves the tags it does not know (40, 64-87, 56500) as CBORTag, so only the one
        # channel used is unpacked and decompressed.
        try:
            msg = cbor2.loads(bytes(parts[0]), max_depth=MAX_DEPTH)
        except Exception as exc:  # cbor2 raises its own errors, and ValueError/TypeError for bad values
            raise Rejected("bad_cbor", f"{type(exc).__name__}: {exc}"[:80]) from None
        if not isinstance(msg, dict):
            raise Rejected("bad_cbor", "message is not a map")
        kind = msg.get("type")
        if kind == "image":
            self._image(msg, received_at, out)
        elif kind == "start":
            self._start(msg, out)
        elif kind == "end":
            self._end(msg, out)
        else:
            raise Rejected("unknown_type", repr(kind)[:40])

    # ------------------------------------------------------------------------------------------
    def _start(self, msg: dict, out: FrameOut) -> None:
        series_id = check_uint(msg, "series_id", "bad_cbor")
        size = (msg.get("image_size_y"), msg.get("image_size_x"))
        if all(isinstance(v, int) for v in size) and size != self.image_shape:
            raise Rejected("wrong_shape", f"series images {size[0]}x{size[1]} vs frame {self.image_shape}")
        channels = msg.get("channels")
        if self.channel and isinstance(channels, list) and self.channel not in channels:
            raise Rejected("no_channel", f"{self.channel!r} not in {channels!r}"[:80])
        count = msg.get("number_of_images")
        count = count if isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= INT64_MAX else None
        self._series[series_id] = _Series(_series_meta(msg, self.channel), count)
        self._series.move_to_end(series_id)
        while len(self._series) > SERIES_KEPT:
            self._series.popitem(last=False)
        out.control(ControlEvent("start", self.source, series_id))

    def _end(self, msg: dict, out: FrameOut) -> None:
        """The run's count: `number_of_images` in the end message where the sender knows it only
        then (peaknet-producer writes it; the spec's end has no count), else the start's."""
        series_id = check_uint(msg, "series_id", "bad_cbor")
        count = check_uint(msg, "number_of_images", "bad_cbor") if "number_of_images" in msg else None
        if count is None:
            series = self._series.get(series_id)
            if series is None or series.count is None:
                raise Rejected("no_start", f"series {series_id}: its start (and image count) went to "
                                           "another reader or was never sent")
            count = series.count
        out.control(ControlEvent("end", self.source, series_id, count))

    def _image(self, msg: dict, received_at: float, out: FrameOut) -> None:
        series_id, image_id = check_uint(msg, "series_id", "bad_cbor"), check_uint(msg, "image_id", "bad_cbor")
        data = msg.get("data")
        if not isinstance(data, dict) or not data:
            raise Rejected("bad_cbor", "image without a data map")
        name = self.channel or next(iter(data))
        array = data.get(name)
        if array is None:
            raise Rejected("no_channel", f"{name!r} not in {list(data)[:4]!r}"[:80])
        wire, payload, algorithm, elem_size = self._unwrap(array)
        nbytes = self.frame_bytes * wire.itemsize
        if algorithm is None:
            if len(payload) != nbytes:
                raise Rejected("size_mismatch", f"{len(payload)} bytes, the array needs {nbytes}")
            raw = payload
        else:
            raw = _decompress(payload, algorithm, elem_size, nbytes)
        slot = out.slot()
        np.copyto(slot, np.frombuffer(raw, dtype=wire).reshape(slot.shape), casting="safe")
        series = self._series.get(series_id)
        meta = dict(series.meta) if series is not None else {}
        out.commit(FrameTag(self.source, image_id, series_id, _timestamp_ns(msg), meta, received_at))

    def _unwrap(self, array: Any) -> tuple[np.dtype, bytes, str | None, int]:
        """A channel's tag-40 array -> (wire dtype, data bytes, compression algorithm, element
        size), its shape and type checked against the frame."""
        if isinstance(array, cbor2.CBORTag) and array.tag == MULTI_DIM_COLUMN_MAJOR:
            raise Rejected("wrong_shape", "column-major arrays (tag 1040) are not supported")
        if not (isinstance(array, cbor2.CBORTag) and array.tag == MULTI_DIM
                and isinstance(array.value, (list, tuple)) and len(array.value) == 2):
            raise Rejected("bad_cbor", "channel data is not a tag-40 [dimensions, array]")
        dims, typed = array.value
        if (not isinstance(dims, (list, tuple))
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
            raise Rejected("bad_cbor", "array dimensions are not integers")
        if tuple(dims) != self.image_shape:
            raise Rejected("wrong_shape", f"{list(dims)} vs frame {list(self.image_shape)}"[:80])
        if not isinstance(typed, cbor2.CBORTag):
            raise Rejected("bad_cbor", "array contents are not a typed array")
        if typed.tag not in TYPED_ARRAYS:
            raise Rejected("wrong_dtype", f"typed-array tag {typed.tag}")
        wire = np.dtype(TYPED_ARRAYS[typed.tag])
        if not np.can_cast(wire, self.dtype, casting="safe"):
            raise Rejected("wrong_dtype", f"{wire} does not cast to {self.dtype} without loss")
        content = typed.value
        if isinstance(content, bytes):
            return wire, content, None, 0
        if not (isinstance(content, cbor2.CBORTag) and content.tag == COMPRESSED):
            raise Rejected("bad_cbor", "typed array holds neither bytes nor a tag-56500 compressed string")
        value = content.value
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[2], bytes)):
            raise Rejected("bad_compression", "tag 56500 is not [algorithm, modifier, bytes]")
        algorithm, elem_size, payload = value
        if algorithm not in ALGORITHMS:
            raise Rejected("bad_compression", f"algorithm {algorithm!r}"[:80])
        if algorithm == "bslz4" and elem_size not in (1, 2, 4, 8):
            raise Rejected("bad_compression", f"bslz4 element size {elem_size!r}"[:80])
        return wire, payload, algorithm, int(elem_size) if algorithm == "bslz4" else 0


def _decompress(payload: bytes, algorithm: str, elem_size: int, nbytes: int) -> bytes:
    """Decompressed bytes, exactly `nbytes`: the size the framing declares is checked first, so
    a small message cannot make the decompressor allocate a large buffer."""
    if len(payload) < 12:
        raise Rejected("bad_compression", f"{len(payload)} bytes: shorter than the 12-byte framing")
    declared = int.from_bytes(payload[:8], "big")
    if declared != nbytes:
        raise Rejected("bad_compression", f"declares {declared} bytes, the array needs {nbytes}")
    try:
        raw = decompress(payload, algorithm, elem_size=elem_size) if elem_size else decompress(payload, algorithm)
    except Exception as exc:  # the library raises RuntimeError or ValueError, often without a message
        raise Rejected("bad_compression", f"{algorithm}: {type(exc).__name__} {exc}"[:80]) from None
    if len(raw) != nbytes:
        raise Rejected("bad_compression", f"{algorithm} gave {len(raw)} bytes, expected {nbytes}")
    return raw


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _positive(value: Any) -> float | None:
    value = _number(value)
    return value if value is not None and value > 0 else None


def _series_meta(msg: dict, channel: str) -> dict[str, Any]:
    """The start message's geometry and beam, under the daemon's meta keys (README, Protocols).
    Values that are missing, not numbers or out of range are left out, not rejected: a start
    with an odd field still opens its run."""
    meta: dict[str, Any] = {}
    energy, wavelength = _positive(msg.get("incident_energy")), _positive(msg.get("incident_wavelength"))
    if energy is None and wavelength is not None:
        energy = HC_EV_ANGSTROM / wavelength
    if energy is not None:
        meta["photon_energy_ev"] = energy
        meta["photon_wavelength_a"] = wavelength or HC_EV_ANGSTROM / energy
    distance = _positive(msg.get("detector_distance"))  # Jungfraujoch: metres
    translation = msg.get("detector_translation")  # the spec: [x, y, z] metres
    if distance is None and isinstance(translation, (list, tuple)) and len(translation) == 3:
        distance = _positive(translation[2])
    if distance is not None:
        meta["detector_distance_mm"] = distance * 1e3
    for key, name, check in (("beam_center_x", "beam_center_x_px", _number), ("beam_center_y", "beam_center_y_px", _number),
                             ("pixel_size_x", "pixel_size_x_m", _positive), ("pixel_size_y", "pixel_size_y_m", _positive)):
        value = check(msg.get(key))
        if value is not None:
            meta[name] = value
    unique = msg.get("series_unique_id")
    if isinstance(unique, str) and len(unique) <= MAX_META_STR:
        meta["series_unique_id"] = unique
    channels = msg.get("channels")
    name = channel or (channels[0] if isinstance(channels, list) and channels else "")
    thresholds = msg.get("threshold_energy")
    if isinstance(name, str) and isinstance(thresholds, dict) and _positive(thresholds.get(name)) is not None:
        meta["threshold_energy_ev"] = _positive(thresholds[name])
    return check_meta(meta)


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def _timestamp_ns(msg: dict) -> int:
    """series_date + start_time (a rational, seconds), in ns since the epoch; the receive time
    when either is missing or odd."""
    date, start = msg.get("series_date"), msg.get("start_time")
    if (isinstance(date, _dt.datetime) and date.tzinfo is not None and isinstance(start, (list, tuple))
            and len(start) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in start)
            and start[1] > 0 and start[0] >= 0):
        base = (date - _EPOCH) // _dt.timedelta(microseconds=1) * 1000
        ns = base + start[0] * 10**9 // start[1]
        if 0 <= ns <= INT64_MAX:
            return ns
    return time.time_ns()
