"""The wire protocols: `peaknet/1` frames in, `peaknet-result/1` peak lists out.

Headers are msgpack maps decoded with size limits and never with pickle. `decode_header` and
`check_frame` raise `Rejected(reason)`; the reason is a short fixed string used as the metrics
label, so every bad message is counted by what was wrong with it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import msgpack
import numpy as np

PROTO = "peaknet/1"
RESULT_PROTO = "peaknet-result/1"
DTYPES = {"uint16": "<u2", "int16": "<i2", "int32": "<i4", "float16": "<f2", "float32": "<f4"}
MAX_HEADER_BYTES = 64 * 1024

# Rejection reasons (metrics labels).
REASONS = (
    "not_msgpack", "bad_header", "unknown_proto", "unknown_type", "wrong_parts", "wrong_shape",
    "wrong_dtype", "size_mismatch", "oversize", "non_finite", "bad_npz",
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
    ts = h.get("timestamp_ns", 0)
    meta = h.get("meta", {}) or {}
    if not isinstance(ts, int) or not isinstance(meta, dict):
        raise Rejected("bad_header", "timestamp_ns must be int and meta a map")
    header = Header(type=kind, source=source, run=run, timestamp_ns=ts, meta=meta)
    if kind == "end":
        count = h.get("count")
        if not isinstance(count, int) or count < 0:
            raise Rejected("bad_header", "end needs a non-negative count")
        header.count = count
    if kind != "frame":
        return header
    seq, shape, dtype = h.get("seq"), h.get("shape"), h.get("dtype")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise Rejected("bad_header", "seq must be an int")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and 0 < s < 1 << 20 for s in shape)):
        raise Rejected("wrong_shape", f"shape {shape!r}"[:60])
    if dtype not in DTYPES:
        raise Rejected("wrong_dtype", repr(dtype)[:40])
    header.seq, header.shape, header.dtype = seq, tuple(shape), dtype
    return header


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


def decode_lclstreamer_npz(payload: bytes | memoryview, shape: Sequence[int], dtype: str,
                           source: str = "lclstreamer") -> Iterator[tuple[Header, np.ndarray]]:
    """Split one lclstreamer `.npz` batch (`detector_data` (B,C,H,W), `timestamp`,
    `photon_wavelength`) into frames. Loaded with allow_pickle=False. Raises Rejected."""
    try:
        with np.load(io.BytesIO(bytes(payload)), allow_pickle=False) as npz:
            data = npz["detector_data"]
            stamps = npz["timestamp"] if "timestamp" in npz.files else None
            wavelength = npz["photon_wavelength"] if "photon_wavelength" in npz.files else None
    except Exception as exc:
        raise Rejected("bad_npz", type(exc).__name__) from None
    if data.ndim == 3:
        data = data[:, None]
    if data.ndim != 4 or tuple(data.shape[1:]) != tuple(shape):
        raise Rejected("wrong_shape", f"detector_data {list(data.shape)} vs frame {list(shape)}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise Rejected("non_finite", "NaN or Inf in detector_data")
    data = data.astype(DTYPES[dtype], copy=False)
    for i in range(data.shape[0]):
        meta = {}
        if wavelength is not None and np.size(wavelength) > i:
            wl = float(np.ravel(wavelength)[i])
            meta["photon_wavelength_a"] = wl
            if wl > 0:
                meta["photon_energy_ev"] = 12398.4198 / wl
        ts = int(np.ravel(stamps)[i] * 1e9) if stamps is not None and np.size(stamps) > i else time.time_ns()
        yield Header(type="frame", source=source, seq=-1, timestamp_ns=ts, shape=tuple(shape),
                     dtype=dtype, meta=meta), data[i]


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
