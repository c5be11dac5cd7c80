"""Record a `peaknet/1` stream to HDF5 that `replay` plays back bit-identically.

Layout (`format = "peaknet-record/1"`): `/data` (N, P, H, W) chunked per frame and compressed;
`/headers` (N,) the raw msgpack header of each frame, so meta keeps its exact types; `/seq`,
`/timestamp_ns` (N,) and `/source` (N,) for quick look-ups; the `start` and `end` headers as
JSON in the `controls` attribute. Frames whose shape or dtype differ from the first are
rejected and counted, as are messages that are not valid `peaknet/1`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zmq

from peaknet_daemon.wire import DTYPES, Header, Rejected, check_frame, decode_header

from .errors import ProducerError
from .progress import Progress, Summary

FORMAT = "peaknet-record/1"
_BYTES = h5py.vlen_dtype(np.uint8)


class RecordWriter:
    """Appends frames with their raw headers to one HDF5 file."""

    def __init__(self, path: str | Path, compression: str | None = "gzip", level: int = 4):
        self.path = Path(path)
        try:
            self.f = h5py.File(self.path, "w", track_order=True)
        except OSError as exc:
            reason = "its folder does not exist" if not self.path.parent.is_dir() else str(exc).split(" (")[0]
            raise ProducerError(f"cannot create {self.path}: {reason}") from None
        self.f.attrs["format"] = FORMAT
        self.compression = None if compression in (None, "none") else compression
        self.level = level if self.compression == "gzip" else None
        self.count, self.rejected = 0, 0
        self.controls: list[dict[str, Any]] = []
        self.shape: tuple[int, ...] | None = None
        self.dtype: str | None = None

    def _create(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape, self.dtype = shape, dtype
        self.f.create_dataset("data", shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape),
                              dtype=np.dtype(DTYPES[dtype]), compression=self.compression,
                              compression_opts=self.level, shuffle=self.compression is not None)
        self.f.create_dataset("headers", shape=(0,), maxshape=(None,), dtype=_BYTES, chunks=(256,))
        self.f.create_dataset("seq", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        self.f.create_dataset("timestamp_ns", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        self.f.create_dataset("source", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
        self.f.attrs["shape"], self.f.attrs["dtype"] = list(shape), dtype

    def add_frame(self, header: Header, raw_header: bytes, frame: np.ndarray) -> bool:
        """Append one frame; False (and counted) when its shape or dtype differ from the first."""
        if self.shape is None:
            self._create(tuple(header.shape), header.dtype)
        if tuple(header.shape) != self.shape or header.dtype != self.dtype:
            self.rejected += 1
            return False
        n = self.count
        for name in ("data", "headers", "seq", "timestamp_ns", "source"):
            self.f[name].resize((n + 1, *self.f[name].shape[1:]))
        self.f["data"][n] = frame
        self.f["headers"][n] = np.frombuffer(raw_header, dtype=np.uint8)
        self.f["seq"][n], self.f["timestamp_ns"][n] = header.seq, header.timestamp_ns
        self.f["source"][n] = header.source
        self.count += 1
        return True

    def add_control(self, header: Header) -> None:
        self.controls.append({"type": header.type, "source": header.source, "run": header.run,
                              "timestamp_ns": header.timestamp_ns, "count": header.count,
                              "meta": header.meta})

    def close(self) -> None:
        self.f.attrs["count"] = self.count
        self.f.attrs["controls"] = json.dumps(self.controls)
        self.f.close()


def record_stream(endpoint: str, output: str | Path, *, bind: bool = False, frames: int | None = None,
                  ends: int = 1, hwm: int = 1000, timeout_s: float = 10.0, compression: str = "gzip",
                  level: int = 4, stop: threading.Event | None = None, progress: bool = False,
                  ready: threading.Event | None = None) -> Summary:
    """Receive until `ends` end messages arrived, `frames` frames were written, or `stop` is set.
    No message for `timeout_s` is a ProducerError (what was recorded is kept). `ready` is set once
    the socket is bound or connected."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        (sock.bind if bind else sock.connect)(endpoint)
    except zmq.ZMQError as exc:
        ctx.destroy(linger=0)
        raise ProducerError(f"cannot {'bind to' if bind else 'connect to'} {endpoint}: {exc}") from None
    if ready is not None:
        ready.set()
    writer = RecordWriter(output, compression, level)
    bar = Progress(progress, frames)
    n_ends = nbytes = 0
    t_first: float | None = None
    last = time.monotonic()
    try:
        while n_ends < ends and (frames is None or writer.count < frames):
            if stop is not None and stop.is_set():
                break
            if not sock.poll(100):
                if time.monotonic() - last > timeout_s:
                    raise ProducerError(f"no message from {endpoint} for {timeout_s:g} s "
                                        f"({writer.count} frames recorded to {output})")
                continue
            parts = sock.recv_multipart(copy=False)
            last = time.monotonic()
            t_first = last if t_first is None else t_first
            try:
                header = decode_header(parts[0].buffer)
                if header.type != "frame":
                    writer.add_control(header)
                    n_ends += header.type == "end"
                    continue
                if len(parts) != 2:
                    raise Rejected("wrong_parts", f"{len(parts)} parts")
                frame = check_frame(header, parts[1].buffer, header.shape, header.dtype)
            except Rejected:
                writer.rejected += 1
                continue
            if writer.add_frame(header, parts[0].bytes, frame):
                nbytes += len(parts[0].buffer) + len(parts[1].buffer)
                bar.update(writer.count, nbytes)
    finally:
        bar.close()
        writer.close()
        sock.close()
        ctx.term()
    seconds = time.monotonic() - t_first if t_first is not None else 0.0
    return Summary(source="record", run="-", frames=writer.count, bytes=nbytes, seconds=seconds)
