"""One actor's CXI output: a writer per run, fed by a thread of its own.

The result thread hands each result (and the frame, for saved events) to a bounded queue and
goes on with the next batch; the disk, and gzip of saved frames (~90 ms per epix10k2M frame),
no longer hold up the pipeline unless the queue is full, which is the backpressure that keeps
memory bounded. Closing a run goes through the same queue, so a run's file is closed only
after every one of its events that was queued before the close has been written.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

import numpy as np

from ..config import Config
from ..geometry import CXI_TARGET, Geometry, load_geometry, render, write_text_atomic
from ..log import get_logger
from . import SinkError
from .base import SinkContext
from .cxi_file import CxiWriter, default_max_peaks, ensure_geometry

DETECTOR_GEOMETRY = "peaknet-detector.geom"  # the CXI files' geometry when detector.geometry is set

log = get_logger("peaknet.cxi")


class CxiSink:
    """See the module docstring. `on_error(exc)` is called (on the writer thread) for every
    failed write or close: counted and logged by the caller, never raised. `spawn(role, loop,
    on_failure)` starts the writer thread (a supervised one in the worker: a failure of the
    loop itself is counted and the loop restarted); by default a plain thread."""

    def __init__(self, cfg: Config, prefix: str, on_error: Callable[[Exception], None],
                 queue_frames: int = 32, spawn: Callable[..., threading.Thread] | None = None):
        self.cfg, self.prefix, self.on_error = cfg, prefix, on_error
        self.max_peaks = default_max_peaks(cfg.pipeline.max_peaks, cfg.pipeline.frame_shape[0])
        self.peaks_truncated = 0  # peaks left out of CXI rows (the weakest of frames over max_peaks)
        self._writers: dict[Any, CxiWriter] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_frames)
        self._current: tuple | None = None  # the item being handled (for the failure handler)
        # detector.geometry: the real panels, checked against the frames (GeometryError), written
        # for the CXI files at each run start; its literal photon energy / distance fill in for
        # frames whose meta lacks them. Without it: the slab placeholder, as before.
        self._geometry: Geometry | None = None
        self._meta_defaults: dict[str, float] = {}
        if cfg.detector.geometry:
            self._geometry = load_geometry(cfg.detector.geometry, cfg.pipeline.frame_shape)
            self._meta_defaults = self._geometry.meta_defaults()
        if spawn is None:
            self._thread = threading.Thread(target=self._loop, name=f"cxi-{prefix}", daemon=True)
            self._thread.start()
        else:
            self._thread = spawn("cxi", self._loop, self._loop_failed)

    @classmethod
    def from_config(cls, cfg: Config, ctx: SinkContext) -> "CxiSink | None":
        """The sink of `output.cxi_dir`; None when no CXI files are configured."""
        if not cfg.output.cxi_dir:
            return None
        return cls(cfg, ctx.prefix, lambda exc: ctx.on_error("cxi", exc),
                   queue_frames=2 * cfg.pipeline.batch_size, spawn=ctx.spawn)

    def mark(self, result: dict) -> None:
        """Set result['truncated']: the peaks this frame's CXI row leaves out (0: none). The
        worker calls it before any sink sees the result, so consumers of the results stream see
        what the files lack; `put` calls it for callers that use this sink alone."""
        result["truncated"] = max(0, int(result["n_peaks"]) - self.max_peaks)

    def wants_frame(self, n_peaks: int) -> bool:
        out = self.cfg.output
        return out.save_frames == "all" or (out.save_frames == "hits" and n_peaks >= out.hit_threshold)

    def put(self, result: dict, frame: np.ndarray | None, poll_s: float = 0.5) -> None:
        """Queue one event (blocks while the queue is full; raises SinkError once the writer
        thread is gone, instead of waiting for ever)."""
        self.mark(result)
        item = ("write", result, frame)
        while True:
            if not self._thread.is_alive():
                raise SinkError("cxi", "the CXI writer thread is not running")
            try:
                self._queue.put(item, timeout=poll_s)
                return
            except queue.Full:
                continue

    def close_run(self, run: Any, timeout: float = 60.0) -> list[str]:
        """Close `run`'s file once its queued events are written; its completed files."""
        if not self._thread.is_alive():
            return self._close(run)
        reply: dict[str, Any] = {"done": threading.Event(), "files": []}
        try:
            self._queue.put(("close", run, reply), timeout=timeout)
        except queue.Full:
            self.on_error(TimeoutError(f"closing run {run!r}: the CXI writer is not keeping up"))
            return []
        if not reply["done"].wait(timeout):
            self.on_error(TimeoutError(f"closing run {run!r} took longer than {timeout:.0f} s"))
        return reply["files"]

    def close(self, timeout: float | None = None) -> bool:
        """Write everything queued, close every run's file, stop the thread. False when the
        writer did not finish within `timeout` (its files are then left as they are)."""
        if self._thread.is_alive():
            try:
                self._queue.put(("stop", None, None), timeout=timeout)
            except queue.Full:
                return False
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        for run in list(self._writers):
            self._close(run)
        return True

    def _loop(self) -> None:
        while True:
            item = self._current = self._queue.get()
            kind, arg, extra = item
            if kind == "stop":
                return
            self._handle(kind, arg, extra)
            self._current = None

    def _handle(self, kind: str, arg: Any, extra: Any) -> None:
        if kind == "close":
            try:
                extra["files"] = self._close(arg)
            finally:
                extra["done"].set()
            return
        writer = None
        try:
            writer = self._writer(arg["run"])
            before = writer.peaks_truncated
            meta = {**self._meta_defaults, **(arg.get("meta") or {})} if self._meta_defaults else None
            writer.write(arg, extra, meta=meta)
        except Exception as exc:  # the writer thread must outlive any bad event or full disk
            self.on_error(exc)
        if writer is not None:
            self.peaks_truncated += writer.peaks_truncated - before

    def _loop_failed(self, exc: BaseException) -> None:
        """The loop itself failed: the event it held is a counted error; a waiting close returns."""
        item, self._current = self._current, None
        if item is None:
            return
        kind, _, extra = item
        if kind == "close":
            extra["done"].set()
        self.on_error(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _writer(self, run: Any) -> CxiWriter:
        writer = self._writers.get(run)
        if writer is None:
            out, p = self.cfg.output, self.cfg.pipeline
            os.makedirs(out.cxi_dir, exist_ok=True)
            shape = tuple(p.frame_shape)
            name = None
            if self._geometry is not None:  # at run start: the detector's geometry, for CXI
                name = DETECTOR_GEOMETRY
                write_text_atomic(os.path.join(out.cxi_dir, name), render(self._geometry, CXI_TARGET, shape))
            else:
                ensure_geometry(out.cxi_dir, shape)  # at run start: the layout's file, checked
            writer = self._writers[run] = CxiWriter(
                out.cxi_dir, self.prefix, shape, p.dtype, max_peaks=self.max_peaks,
                frames_per_file=out.frames_per_file, save_frames=out.save_frames,
                hit_threshold=out.hit_threshold, compression=out.compression, geometry=False,
                geometry_file=name)
        return writer

    def _close(self, run: Any) -> list[str]:
        writer = self._writers.pop(run, None)
        if writer is None:
            return []
        try:
            writer.close()
        except Exception as exc:
            self.on_error(exc)
        return [str(f) for f in writer.files()]

