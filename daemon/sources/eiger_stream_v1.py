"""EIGER Stream V1 (SIMPLON 1.x stream interface): JSON parts plus binary blobs on the detector's
PUSH socket (port 9999), as EIGER detectors and ALBA's `eiger-simulator` send them.

Messages, told apart by part 0's `htype`:
- `dheader-1.0` (series, header_detail none | basic | all): with basic/all part 1 is the detector
  config (nimages, ntrigger, photon_energy, detector_distance, beam_center_x/y, ...); with all,
  three (header, blob) pairs follow: flatfield, pixel mask, count-rate table.
- `dimage-1.0` (series, frame) + `dimage_d-1.0` (shape [x, y], type, encoding, size) + the data
  blob + `dconfig-1.0` (start/stop/real time); one frame.
- `dseries_end-1.0` (series).
Each message may end with one appendix part (the detector's header/image appendix), ignored.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import bitshuffle
import lz4.block
import numpy as np

from ..wire import DTYPES, HC_EV_ANGSTROM, Rejected, check_uint
from .base import ControlEvent, FrameOut, FrameTag, SourceSpec

MAX_JSON_BYTES = 1 << 20  # one JSON part; the detector config of header_detail basic is ~10 KiB
SERIES_KEPT = 8  # header state of this many recent series (a reader may see frames of an old one)
WIRE_TYPES = {"uint8": "u1", "uint16": "<u2", "uint32": "<u4", "int32": "<i4", "float32": "<f4"}
# encoding -> bitshuffle element bytes (0: no bitshuffle), lz4 or not
ENCODINGS = {"<": (0, False), "lz4<": (0, True), "bs8-lz4<": (1, True), "bs16-lz4<": (2, True),
             "bs32-lz4<": (4, True)}
HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}
BSHUF_BLOCK_BYTES = 8192  # bitshuffle's default block: 8192 bytes' worth of elements


@dataclass
class _Series:
    """What a `dheader` told about one series."""

    count: int | None  # nimages x ntrigger, when the config said
    meta: dict[str, Any] = field(default_factory=dict)


class EigerStreamV1Source:
    """Stateful per socket: a series' header sets the run's count and metadata for its frames.

    The source name is the socket's endpoint, the run the series id, seq the frame number. Each
    2-D image (y rows of x pixels) fills the (panels, H, W) frame when panels x H == y and W == x.
    Pixels at the wire type's maximum (how the EIGER marks masked and gap pixels) become 0, so
    module gaps are not found as peaks."""

    def __init__(self, spec: SourceSpec):
        self.shape = tuple(spec.frame_shape)
        self.dtype = np.dtype(DTYPES[spec.dtype])
        self.image_shape = (self.shape[0] * self.shape[1], self.shape[2])
        self.source = spec.endpoint
        self.series: OrderedDict[int, _Series] = OrderedDict()

    def decode(self, parts: Sequence[memoryview], received_at: float, out: FrameOut) -> None:
        first = _json(parts[0])
        htype = first.get("htype")
        if not isinstance(htype, str):
            raise Rejected("bad_header", "part 0 has no htype")
        if htype == "dimage-1.0":
            self._image(first, parts, received_at, out)
        elif htype == "dheader-1.0":
            self._header(first, parts, out)
        elif htype == "dseries_end-1.0":
            self._end(first, parts, out)
        elif htype.split("-")[0] in ("dimage", "dheader", "dseries_end"):
            raise Rejected("unknown_proto", htype[:40])
        else:
            raise Rejected("unknown_type", htype[:40])

    # ------------------------------------------------------------------ series header and end
    def _header(self, head: dict, parts: Sequence[memoryview], out: FrameOut) -> None:
        series = check_uint(head, "series", "bad_header")
        detail = head.get("header_detail")
        if detail not in HEADER_PARTS:
            raise Rejected("bad_header", f"header_detail {detail!r}"[:60])
        n = HEADER_PARTS[detail]
        if len(parts) not in (n, n + 1):  # + a header appendix
            raise Rejected("wrong_parts", f"dheader ({detail}) has {len(parts)} parts, expected {n}")
        info = _Series(count=None)
        if detail != "none":
            config = _json(parts[1])
            info = _Series(count=_image_count(config), meta=_config_meta(config))
        if detail == "all":
            for i, want in ((2, "dflatfield-1.0"), (4, "dpixelmask-1.0"), (6, "dcountrate_table-1.0")):
                got = _json(parts[i]).get("htype")
                if got != want:
                    raise Rejected("bad_header", f"part {i} is {got!r}, expected {want}"[:80])
        self.series[series] = info
        self.series.move_to_end(series)
        while len(self.series) > SERIES_KEPT:
            self.series.popitem(last=False)
        out.control(ControlEvent("start", self.source, series))

    def _end(self, head: dict, parts: Sequence[memoryview], out: FrameOut) -> None:
        if len(parts) not in (1, 2):
            raise Rejected("wrong_parts", f"dseries_end has {len(parts)} parts, expected 1")
        series = check_uint(head, "series", "bad_header")
        info = self.series.get(series)
        # Only the header knows how many images the series has. Without it (another reader
        # took the header, or the sender's config had no nimages) no count is reported and the
        # run settles when the next series appears or at shutdown (README, EIGER Stream V1).
        if info is not None and info.count is not None:
            out.control(ControlEvent("end", self.source, series, info.count))

    # ------------------------------------------------------------------ images
    def _image(self, head: dict, parts: Sequence[memoryview], received_at: float, out: FrameOut) -> None:
        if len(parts) not in (4, 5):  # + an image appendix
            raise Rejected("wrong_parts", f"dimage has {len(parts)} parts, expected 4")
        series, frame = check_uint(head, "series", "bad_header"), check_uint(head, "frame", "bad_header")
        desc = _json(parts[1])
        if desc.get("htype") != "dimage_d-1.0":
            raise Rejected("bad_header", f"part 1 is {desc.get('htype')!r}, expected dimage_d-1.0"[:80])
        if _json(parts[3]).get("htype") != "dconfig-1.0":
            raise Rejected("bad_header", "part 3 is not dconfig-1.0")
        shape = desc.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise Rejected("wrong_shape", f"shape {shape!r}"[:60])
        image_shape = (shape[1], shape[0])  # [x, y]: y rows of x pixels
        if image_shape != self.image_shape:
            raise Rejected("wrong_shape", f"image {image_shape[0]}x{image_shape[1]} does not fill frame "
                                          f"{list(self.shape)}")
        type_name = desc.get("type")
        if type_name not in WIRE_TYPES:
            raise Rejected("wrong_dtype", repr(type_name)[:40])
        wire = np.dtype(WIRE_TYPES[type_name])
        if not np.can_cast(wire, self.dtype, casting="safe"):
            raise Rejected("wrong_dtype", f"{type_name} does not cast to {self.dtype} without loss")
        encoding = desc.get("encoding")
        if encoding not in ENCODINGS:
            raise Rejected("bad_compression", f"unsupported encoding {encoding!r}"[:60])
        data = parts[2]
        size = desc.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size != len(data):
            raise Rejected("size_mismatch", f"{len(data)} bytes, dimage_d says {size}")
        image = _decode_data(data, encoding, image_shape, wire)
        slot = out.slot().reshape(self.image_shape)
        np.copyto(slot, image, casting="safe")
        if wire.kind == "u":
            slot[slot == np.iinfo(wire).max] = 0
        info = self.series.get(series)
        meta = dict(info.meta) if info is not None else {}
        out.commit(FrameTag(self.source, frame, series, time.time_ns(), meta, received_at))


def _decode_data(data: memoryview, encoding: str, shape: tuple[int, int], wire: np.dtype) -> np.ndarray:
    """The image of one data blob; its size is the frame's, checked before anything is inflated
    (the caller checked the shape against the slot). Raises Rejected."""
    shuffle_bytes, compressed = ENCODINGS[encoding]
    nbytes = shape[0] * shape[1] * wire.itemsize
    if not compressed:
        if len(data) != nbytes:
            raise Rejected("size_mismatch", f"{len(data)} bytes, the image needs {nbytes}")
        return np.frombuffer(data, dtype=wire).reshape(shape)
    if not shuffle_bytes:
        try:
            raw = lz4.block.decompress(data, uncompressed_size=nbytes)
        except Exception as exc:  # lz4.block.LZ4BlockError, or a bad buffer
            raise Rejected("bad_compression", f"lz4: {exc}"[:80]) from None
        if len(raw) != nbytes:
            raise Rejected("bad_compression", f"lz4 gave {len(raw)} bytes, the image needs {nbytes}")
        return np.frombuffer(raw, dtype=wire).reshape(shape)
    if shuffle_bytes != wire.itemsize:
        raise Rejected("bad_compression", f"{encoding} for {wire.itemsize}-byte pixels")
    payload, block = _bslz4_framing(data, nbytes, wire.itemsize)
    _check_blocks(payload, shape[0] * shape[1], wire.itemsize, block)
    try:
        return bitshuffle.decompress_lz4(np.frombuffer(payload, np.uint8), shape, wire, block)
    except Exception as exc:  # bitshuffle raises RuntimeError with the C error code
        raise Rejected("bad_compression", f"bitshuffle: {exc}"[:80]) from None


def _bslz4_framing(data: memoryview, nbytes: int, itemsize: int) -> tuple[memoryview, int]:
    """(bitshuffle blocks, block size in elements). An EIGER prefixes the blocks with the HDF5
    filter's 12 bytes (uint64 BE image bytes, uint32 BE block bytes); eiger-simulator sends the
    blocks alone, with bitshuffle's default block size."""
    if len(data) >= 12 and int.from_bytes(data[:8], "big") == nbytes:
        block_bytes = int.from_bytes(data[8:12], "big")
        if block_bytes % (8 * itemsize) or not 0 < block_bytes <= 1 << 30:
            raise Rejected("bad_compression", f"block size {block_bytes} bytes")
        return data[12:], block_bytes // itemsize
    return data, max(128, BSHUF_BLOCK_BYTES // itemsize // 8 * 8)


def _check_blocks(payload: memoryview, n: int, itemsize: int, block: int) -> None:
    """Walk the blocks' BE uint32 length prefixes: they must tile the payload exactly, so that
    the C decoder, which trusts them, never reads past the message."""
    full, rest = divmod(n, block)
    sizes = [block] * full + ([rest - rest % 8] if rest >= 8 else [])
    pos, end = 0, len(payload)
    for _ in sizes:
        if pos + 4 > end:
            raise Rejected("bad_compression", "bitshuffle blocks truncated")
        pos += 4 + int.from_bytes(payload[pos:pos + 4], "big")
    if pos + (n % 8) * itemsize != end:
        raise Rejected("bad_compression", f"bitshuffle blocks span {pos} of {end} bytes")


def _json(part: memoryview) -> dict:
    """One JSON part as a dict; Rejected when it is too large, not JSON or not an object."""
    if len(part) > MAX_JSON_BYTES:
        raise Rejected("oversize", f"JSON part of {len(part)} bytes")
    try:
        value = json.loads(bytes(part))
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, RecursionError
        raise Rejected("bad_encoding", f"not JSON: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise Rejected("bad_header", "JSON part is not an object")
    return value


def _positive(config: dict, key: str) -> float | None:
    """A finite number > 0 from the detector config, else None (a config value is not worth a
    rejection: the frames are still good)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def _image_count(config: dict) -> int | None:
    nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10**10 for v in (nimages, ntrigger))
    return nimages * ntrigger if ok else None


def _config_meta(config: dict) -> dict[str, Any]:
    """The per-run metadata that sinks use, in the daemon's units (eV, mm, pixels, m)."""
    meta: dict[str, Any] = {}
    energy, wavelength = _positive(config, "photon_energy"), _positive(config, "wavelength")
    if energy is None and wavelength is not None:
        energy = HC_EV_ANGSTROM / wavelength
    if energy is not None:
        meta["photon_energy_ev"] = energy
        meta["photon_wavelength_a"] = HC_EV_ANGSTROM / energy
    distance = _positive(config, "detector_distance")
    if distance is not None:
        meta["detector_distance_mm"] = distance * 1e3
    for key, name in (("beam_center_x", "beam_center_x_px"), ("beam_center_y", "beam_center_y_px"),
                      ("x_pixel_size", "pixel_size_x_m"), ("y_pixel_size", "pixel_size_y_m")):
        value = _positive(config, key)
        if value is not None:
            meta[name] = value
    return meta
