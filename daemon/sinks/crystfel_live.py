"""CrystFEL live hand-off: indexamajig asks for the next hit, this sink answers with one.

`indexamajig --zmq-input=tcp://HOST:PORT --zmq-request=next --data-format=msgpack
--peaks=msgpack -g peaknet-live.geom` connects a REQ socket to our REP socket (actor i binds
PORT + i) and sends a request per frame it wants; the reply is one hit as a msgpack map in the
layout CrystFEL's online-processing documentation (doc/articles/online.rst) describes:

- `detector_data`: the frame as the 2-D slab (P*H, W), a map `{type: "<f4" | "<i4", shape:
  [P*H, W], data: bin}`;
- `peak_list`: a map of equal-length float arrays `fs`, `ss`, `intensity`; `ss = panel*H + y`,
  `fs = x` in our pixel-centre convention, with no offset applied: indexamajig adds its default
  half-pixel shift (0.5 px, to its pixel-corner convention) exactly as it does for the CXI files'
  peaks, so do not pass `--no-half-pixel-shift` (the CXI sink writes peaks the same way);
- `photon_energy_eV`, `detector_distance_mm`: the frame's `meta` (else the number the detector
  geometry file gives, else NaN), which the geometry file this sink writes points at;
- `source`, `seq`, `run`, `timestamp_ns`, `n_peaks`: for the record (CrystFEL ignores them).

CrystFEL looks a key up by comparing only as many characters as the map's key has, first match
wins, so no key of the map is a prefix of a name it looks up (the tests read messages that way).

Hits wait in a bounded queue: when indexamajig is slower than the hits arrive, the oldest hit is
dropped and counted (`dropped["crystfel_queue_full"]`), so the indexer always gets recent frames
and the pipeline never waits for it. A thread of its own serves the socket; `put` never blocks.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from ..config import Config, bind_endpoint
from ..geometry import MSGPACK_TARGET, Geometry, load_geometry, parse_geometry, render, write_text_atomic
from ..log import get_logger
from . import SinkError
from .base import SinkContext
from .cxi_file import slab_geometry_text

log = get_logger(__name__)
LIVE_GEOMETRY = "peaknet-live.geom"  # in output.cxi_dir unless output.crystfel_geometry names a file
# The names CrystFEL looks up in a message (MSGPACK_TARGET) and the other keys we send.
LOOKUPS = (MSGPACK_TARGET.data, MSGPACK_TARGET.peak_list, MSGPACK_TARGET.photon_energy, MSGPACK_TARGET.clen)
RECORD_KEYS = ("source", "seq", "run", "timestamp_ns", "n_peaks")


def encode_hit(result: dict, frame: np.ndarray, defaults: dict[str, float] | None = None) -> bytes:
    """One hit as CrystFEL's msgpack map (see the module docstring). `defaults`: photon energy
    and distance for frames whose meta lacks them."""
    if frame.ndim != 3:
        raise ValueError(f"frame must be (panels, H, W), got shape {frame.shape}")
    p, h, w = frame.shape
    dtype = "<i4" if frame.dtype == np.int32 else "<f4"  # the two types CrystFEL reads
    slab = np.ascontiguousarray(frame, dtype=dtype).reshape(p * h, w)
    peaks = result.get("peaks") or {}
    n = len(peaks.get("x", ()))
    cols = {}
    for key in ("panel", "y", "x", "intensity"):
        cols[key] = np.asarray(peaks.get(key, ()), dtype=np.float64)
        if cols[key].shape != (n,):
            raise ValueError(f"peak column {key} has shape {cols[key].shape}, expected ({n},)")
    meta = {**(defaults or {}), **(result.get("meta") or {})}

    def number(key: str) -> float:
        value = meta.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

    msg = {
        MSGPACK_TARGET.data: {"type": dtype, "shape": [p * h, w], "data": memoryview(slab).cast("B")},
        # floats, always: CrystFEL reads each element as a float64 (an integer would be misread)
        MSGPACK_TARGET.peak_list: {"fs": cols["x"].tolist(), "ss": (cols["panel"] * h + cols["y"]).tolist(),
                                   "intensity": cols["intensity"].tolist()},
        MSGPACK_TARGET.photon_energy: number("photon_energy_ev"),
        MSGPACK_TARGET.clen: number("detector_distance_mm"),
        "source": str(result.get("source", "")), "seq": int(result.get("seq", 0)),
        "run": run if isinstance(run := result.get("run", 0), (int, str)) else str(run),
        "timestamp_ns": int(result.get("timestamp_ns", 0)), "n_peaks": int(result.get("n_peaks", n)),
    }
    return msgpack.packb(msg, use_bin_type=True)


class CrystfelLiveSink:
    """See the module docstring. `spawn(role, loop, on_failure)` runs the serving loop (a
    supervised thread in the worker); by default a plain thread."""

    def __init__(self, cfg: Config, endpoint: str, geometry_path: str, zmq_context: zmq.Context,
                 on_error: Callable[[BaseException], None], secure: Callable[[zmq.Socket], None] | None = None,
                 spawn: Callable[..., threading.Thread] | None = None, queue_hits: int = 32, poll_ms: int = 100):
        self.hit_threshold = cfg.output.hit_threshold
        self.on_error, self.poll_ms, self.queue_hits = on_error, poll_ms, queue_hits
        self._dropped: dict[str, int] = {}
        self.served = 0
        self._hits: deque[tuple[dict, np.ndarray]] = deque()
        self._cond = threading.Condition()  # (re-entrant) guards the queue and the drop counts
        self._stopping = threading.Event()
        self._owes_reply = False  # a request was taken and not yet answered (survives a restart)
        self._warned_no_energy = False
        shape = tuple(cfg.pipeline.frame_shape)
        geometry: Geometry = (load_geometry(cfg.detector.geometry, shape) if cfg.detector.geometry
                              else parse_geometry(slab_geometry_text(shape), "the slab placeholder"))
        self._defaults = geometry.meta_defaults()
        self.geometry_path = write_text_atomic(geometry_path, render(geometry, MSGPACK_TARGET, shape))
        sock = zmq_context.socket(zmq.REP)
        try:
            sock.setsockopt(zmq.LINGER, 0)  # an unanswered indexer gets nothing more once we close
            if secure is not None:
                secure(sock)  # CURVE (security.py): before bind
            sock.bind(endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        except zmq.ZMQError as exc:
            sock.close(0)
            raise SinkError("crystfel", f"cannot bind {endpoint}: {exc}") from exc
        self._sock: zmq.Socket | None = sock
        self._sock_lock = threading.Lock()
        if spawn is None:
            self._thread = threading.Thread(target=self._loop, name="crystfel-live", daemon=True)
            self._thread.start()
        else:
            self._thread = spawn("crystfel", self._loop, self._loop_failed)
        log.info("crystfel live hand-off", endpoint=self.endpoint, geometry=str(self.geometry_path),
                 queue=queue_hits)

    @classmethod
    def from_config(cls, cfg: Config, ctx: SinkContext) -> "CrystfelLiveSink | None":
        """The hand-off of `output.crystfel_endpoint`; None when it is empty."""
        out = cfg.output
        if not out.crystfel_endpoint:
            return None
        path = out.crystfel_geometry or os.path.join(out.cxi_dir, LIVE_GEOMETRY)
        return cls(cfg, bind_endpoint(out.crystfel_endpoint, ctx.index), path, ctx.zmq_context,
                   lambda exc: ctx.on_error("crystfel", exc), secure=ctx.secure, spawn=ctx.spawn,
                   queue_hits=out.crystfel_queue)

    # ResultSink (base.py) ----------------------------------------------------------------------
    def wants_frame(self, n_peaks: int) -> bool:
        return n_peaks >= self.hit_threshold

    def put(self, result: dict, frame: np.ndarray | None) -> None:
        """Queue a hit for the indexer; never blocks (a full queue drops its oldest hit)."""
        if frame is None or self._stopping.is_set():
            return
        with self._cond:
            if len(self._hits) >= self.queue_hits:
                self._hits.popleft()
                self._count("crystfel_queue_full")
            self._hits.append((result, frame))
            self._cond.notify()

    def close_run(self, run: Any, timeout: float = 0.0) -> list[str]:
        return []

    def close(self, timeout: float | None = None) -> bool:
        """Stop serving (within a poll interval) and close the socket; hits still queued are
        counted as dropped (`crystfel_closed`). False when the thread did not stop in time."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._close_socket()
        with self._cond:
            left, self._hits = len(self._hits), deque()
        if left:
            self._count("crystfel_closed", left)
        return True

    @property
    def dropped(self) -> dict[str, int]:
        """Hits not handed over, by reason (a copy: the stats thread reads while others count)."""
        with self._cond:
            return dict(self._dropped)

    # ------------------------------------------------------------------------------------------
    def _count(self, reason: str, n: int = 1) -> None:
        with self._cond:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def _next_hit(self) -> tuple[dict, np.ndarray] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._hits or self._stopping.is_set(), self.poll_ms / 1e3)
            return self._hits.popleft() if self._hits and not self._stopping.is_set() else None

    def _loop(self) -> None:
        """Take a request, answer it with the next hit (waiting for one); until close()."""
        try:
            sock = self._sock
            assert sock is not None
            while not self._stopping.is_set():
                if not self._owes_reply:
                    if not sock.poll(self.poll_ms, zmq.POLLIN):
                        continue
                    sock.recv()  # the request's content (indexamajig's --zmq-request string) is not checked
                    self._owes_reply = True
                hit = self._next_hit()
                if hit is None:
                    continue
                result, frame = hit
                try:
                    msg = encode_hit(result, frame, self._defaults)
                except Exception as exc:  # one bad result must not stop the hand-off
                    self._count("crystfel_bad_hit")
                    self.on_error(exc)
                    continue
                self._warn_unknown_energy(result)
                self.served += 1  # counted before it leaves: whoever has the reply sees it counted
                sock.send(msg, copy=False)
                self._owes_reply = False
        finally:
            if self._stopping.is_set():
                self._close_socket()

    def _warn_unknown_energy(self, result: dict) -> None:
        if self._warned_no_energy:
            return
        meta = {**self._defaults, **(result.get("meta") or {})}
        if "photon_energy_ev" not in meta or "detector_distance_mm" not in meta:
            self._warned_no_energy = True
            log.warning("crystfel hand-off: hits without photon energy or detector distance (sent as NaN); "
                        "give them in the frames' meta or as numbers in detector.geometry",
                        source=result.get("source"), seq=result.get("seq"))

    def _loop_failed(self, exc: BaseException) -> None:
        self.on_error(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _close_socket(self) -> None:
        with self._sock_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(0)
