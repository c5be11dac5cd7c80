"""The wire protocols: `peaknet/1` frames in, `peaknet-result/1` peak lists out.

Headers are msgpack maps decoded with size limits and never with pickle. `decode_header` and
`check_frame` raise `Rejected(reason)`; the reason is a short fixed string used as the metrics
label, so every bad message is counted by what was wrong with it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

PROTO = "peaknet/1"
RESULT_PROTO = "peaknet-result/1"
DTYPES = {"uint16": "<u2", "int16": "<i2", "int32": "<i4", "float16": "<f2", "float32": "<f4"}
MAX_HEADER_BYTES = 64 * 1024
INT64_MAX = 2**63 - 1
MAX_RUN_FRAMES = 10**10  # an `end` count above this is a bug or an attack (~11 days at 10 kHz)
MAX_NAME_CHARS = 256  # source, a run given as a string, a meta key
MAX_META_KEYS = 64
MAX_META_STR = 1024  # characters of a string value in meta
MAX_META_LIST = 4096  # items of a list value in meta (e.g. the simulator's truth_* columns)
POSITIVE_META = ("photon_energy_ev", "detector_distance_mm")  # known keys: finite numbers > 0
NPZ_MEMBERS = ("detector_data", "timestamp", "photon_wavelength")
HC_EV_ANGSTROM = 12398.4198

# Rejection reasons (metrics labels).
REASONS = (
    "not_msgpack", "bad_header", "unknown_proto", "unknown_type", "wrong_parts", "wrong_shape",
    "wrong_dtype", "size_mismatch", "oversize", "non_finite", "bad_npz", "bad_meta", "out_of_range",
    "bad_encoding", "bad_compression",
    # DECTRIS Stream V2 (sources/stream2.py)
    "bad_cbor", "no_channel", "no_start",
)


class Rejected(Exception):
    """A message that is not a valid frame; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Header:
    type: str
    source: str
    seq: int = 0
    run: int | str = 0
    timestamp_ns: int = 0
    shape: tuple[int, ...] = ()
    dtype: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    count: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype]).itemsize if self.shape else 0


# ----------------------------------------------------------------------------------------------
# Encoding (producers)
# ----------------------------------------------------------------------------------------------

def encode_frame(frame: np.ndarray, source: str, seq: int, run: int | str = 0,
                 timestamp_ns: int | None = None, meta: dict | None = None) -> list[bytes | memoryview]:
    """A frame as the two parts of a `peaknet/1` message (the payload is not copied)."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = frame[None]
    if frame.ndim != 3:
        raise ValueError(f"a frame is (panels, H, W) or (H, W), got shape {frame.shape}")
    name = dtype_name(frame.dtype)
    frame = np.ascontiguousarray(frame, dtype=np.dtype(DTYPES[name]))
    header = {
        "proto": PROTO, "type": "frame", "source": source, "seq": int(seq), "run": run,
        "timestamp_ns": int(time.time_ns() if timestamp_ns is None else timestamp_ns),
        "shape": list(frame.shape), "dtype": name, "meta": dict(meta or {}),
    }
    return [msgpack.packb(header), memoryview(frame).cast("B")]


def encode_control(kind: str, source: str, run: int | str = 0, count: int = 0,
                   meta: dict | None = None) -> list[bytes]:
    """A `start` or `end` message (one part). `end` carries the number of frames sent."""
    if kind not in ("start", "end"):
        raise ValueError(f"control type must be start or end, got {kind!r}")
    header = {"proto": PROTO, "type": kind, "source": source, "run": run,
              "timestamp_ns": time.time_ns(), "meta": dict(meta or {})}
    if kind == "end":
        header["count"] = int(count)
    return [msgpack.packb(header)]


def dtype_name(dtype: Any) -> str:
    """The protocol's name for a numpy dtype, or ValueError when it is not allowed."""
    dt = np.dtype(dtype)
    for name, code in DTYPES.items():
        if dt == np.dtype(code) or dt == np.dtype(code).newbyteorder("="):
            return name
    raise ValueError(f"dtype {dt} is not one of {', '.join(DTYPES)}")


# ----------------------------------------------------------------------------------------------
# Decoding (daemon ingest, recorder)
# ----------------------------------------------------------------------------------------------

def decode_header(raw: bytes | memoryview) -> Header:
    """Parse and check a `peaknet/1` header; raises Rejected."""
    if len(raw) > MAX_HEADER_BYTES:
        raise Rejected("oversize", f"header of {len(raw)} bytes")
    try:
        h = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise Rejected("not_msgpack", type(exc).__name__) from None
    if not isinstance(h, dict):
        raise Rejected("bad_header", "header is not a map")
    if h.get("proto") != PROTO:
        raise Rejected("unknown_proto", repr(h.get("proto"))[:40])
    kind = h.get("type")
    if kind not in ("frame", "start", "end"):
        raise Rejected("unknown_type", repr(kind)[:40])
    source, run = h.get("source"), h.get("run", 0)
    if not isinstance(source, str) or not isinstance(run, (int, str)) or isinstance(run, bool):
        raise Rejected("bad_header", "source must be str and run int or str")
    if len(source) > MAX_NAME_CHARS or (isinstance(run, str) and len(run) > MAX_NAME_CHARS):
        raise Rejected("bad_header", f"source or run longer than {MAX_NAME_CHARS} characters")
    if isinstance(run, int):
        _check_int64("run", run)
    ts = h.get("timestamp_ns", 0)
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise Rejected("bad_header", "timestamp_ns must be an int")
    _check_int64("timestamp_ns", ts)
    meta = check_meta(h.get("meta", {}))
    header = Header(type=kind, source=source, run=run, timestamp_ns=ts, meta=meta)
    if kind == "end":
        count = h.get("count")
        if not isinstance(count, int) or isinstance(count, bool):
            raise Rejected("bad_header", "end needs an int count")
        _check_int64("count", count, hi=MAX_RUN_FRAMES)
        header.count = count
    if kind != "frame":
        return header
    seq, shape, dtype = h.get("seq"), h.get("shape"), h.get("dtype")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise Rejected("bad_header", "seq must be an int")
    _check_int64("seq", seq)
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and 0 < s < 1 << 20 for s in shape)):
        raise Rejected("wrong_shape", f"shape {shape!r}"[:60])
    if dtype not in DTYPES:
        raise Rejected("wrong_dtype", repr(dtype)[:40])
    header.seq, header.shape, header.dtype = seq, tuple(shape), dtype
    return header


def _check_int64(name: str, value: int, hi: int = INT64_MAX) -> None:
    """Counters and stamps are int64 in every sink (CXI, metrics): 0 <= value <= hi."""
    if not 0 <= value <= hi:
        raise Rejected("out_of_range", f"{name} {value} is outside [0, {hi}]"[:80])


def check_uint(fields: dict, key: str, reason: str) -> int:
    """`fields[key]` as a counter or id of a detector's header: an int (else `reason`, the
    format's own rejection) in the int64 range every sink keeps (else `out_of_range`)."""
    value = fields.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Rejected(reason, f"{key} must be an unsigned integer, got {value!r}"[:80])
    _check_int64(key, value)
    return value


def _is_scalar(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -INT64_MAX - 1 <= v <= INT64_MAX
    if isinstance(v, float):
        return True
    return isinstance(v, str) and len(v) <= MAX_META_STR


def check_meta(meta: Any) -> dict[str, Any]:
    """`meta` is a flat map: str keys -> a scalar (int64, float, str, bool, nil) or a list of
    scalars; the known physical keys are finite positive numbers. Raises Rejected('bad_meta')."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise Rejected("bad_meta", "meta must be a map")
    if len(meta) > MAX_META_KEYS:
        raise Rejected("bad_meta", f"{len(meta)} keys > {MAX_META_KEYS}")
    for key, value in meta.items():
        if not isinstance(key, str) or len(key) > MAX_NAME_CHARS:
            raise Rejected("bad_meta", f"key {key!r} is not a string of <= {MAX_NAME_CHARS} characters"[:80])
        if isinstance(value, list):
            ok = len(value) <= MAX_META_LIST and all(_is_scalar(v) for v in value)
        else:
            ok = _is_scalar(value)
        if not ok:
            raise Rejected("bad_meta", f"{key}: not a scalar or a flat list of scalars"[:80])
    for key in POSITIVE_META:
        value = meta.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= 0):
            raise Rejected("bad_meta", f"{key} must be a finite number > 0, got {value!r}"[:80])
    return meta


def check_frame(header: Header, payload: bytes | memoryview, shape: Sequence[int], dtype: str) -> np.ndarray:
    """Check a frame's header and payload against the configured shape and dtype; returns a
    zero-copy array view of the payload. Raises Rejected."""
    if tuple(header.shape) != tuple(shape):
        raise Rejected("wrong_shape", f"{list(header.shape)} != configured {list(shape)}")
    if header.dtype != dtype:
        raise Rejected("wrong_dtype", f"{header.dtype} != configured {dtype}")
    if len(payload) != header.nbytes:
        raise Rejected("size_mismatch", f"{len(payload)} bytes, header says {header.nbytes}")
    # NaN/Inf are found on the device, in the pipeline: a host pass over every payload would
    # cost more than the copy (`non_finite` is counted there).
    return np.frombuffer(payload, dtype=DTYPES[dtype]).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def encode_result(result: dict) -> bytes:
    """A `peaknet-result/1` message. `result` holds the protocol's keys; numpy columns are
    converted to lists."""
    peaks = {k: np.asarray(v).tolist() for k, v in result["peaks"].items()}
    return msgpack.packb({**result, "proto": RESULT_PROTO, "peaks": peaks})


def decode_result(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False)
