"""Ingest processes: receive, validate and copy frames into shared batch slots.

Each actor runs `ingest.processes` of these, each with its share of the configured sockets,
because one Python process tops out at ~6 GB/s of receiving and copying (DESIGN.md). A process
polls its sockets on one thread, copies each accepted payload once into the batch slot it
holds, and hands the slot back to the GPU process, by index, when the batch is full or
`max_batch_delay_ms` old. A partial batch that is due waits while the device already has
`BUSY_BATCHES` batches in flight (the ring's gauge), at most `HOLD_MAX_S`: behind a queued
batch it could not start sooner, and it would cost a whole device pass for a few frames, so a
net slower than the delay would fall behind and queue. (Holding until the device is idle was
worse: processes that share a stream all flush at once. README, Runtime, has the figures.)
Talk with the GPU process is msgpack over a pipe:

    GPU process -> ingest:  ["slot", index]   a free slot to fill
                            ["stop"]          drain the sockets' queues, then finish
    ingest -> GPU process:  ["batch", index, n, tags]   n frames are in slot `index`
                            ["return", index]           an unused slot, at stop
                            ["control", event]          a start/end message
                            ["done"]                    drained and finished

Counters (frames, controls, rejections by reason, heartbeat, time without a free slot to fill)
live in this process's row of the shared counters table, so they survive the process. The
process exits when its parent dies (PR_SET_PDEATHSIG, and end-of-file on the pipe).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import msgpack
import numpy as np
import zmq

from .config import Config, SocketConfig
from .ingest import SocketReader
from .log import RateLimitedLog, configure_logging, get_logger
from .security import SocketGuard
from .shm_ring import (AUTH_FAILURES, CONTROLS, DISCONNECTS, FRAMES, HEARTBEAT_NS, INGEST_REASONS, REJECTED0,
                       SLOT_WAIT_NS, SharedRing)
from .sources import ControlEvent, FrameTag

log = get_logger("peaknet.ingest")
SLOTS_WANTED = 2  # slots an ingest process holds: the one it fills and a spare
RECV_BURST = 64  # messages taken off one socket before the others get a turn
DRAIN_IDLE_MS = 200  # stopping: the sockets' queues are empty when a poll this long finds nothing
BUSY_BATCHES = 2  # a due partial batch waits while the device has this many batches in flight
HOLD_MAX_S = 1.0  # ... but never longer than this after it opened
BUSY_POLL_MS = 1  # how often a held batch looks at the gauge again


@dataclass(frozen=True)
class SocketSpec:
    """One PULL socket an ingest process opens: its config and the endpoint it uses."""

    cfg: SocketConfig
    endpoint: str


def plan_sockets(specs: list[SocketSpec], processes: int) -> list[list[SocketSpec]]:
    """Deal sockets round-robin over min(processes, len(specs)) ingest processes."""
    n = max(1, min(processes, len(specs)))
    return [specs[i::n] for i in range(n)]


def default_processes(n_sockets: int) -> int:
    """`ingest.processes: 0`: one per socket, at most 4 (4 reached detector rates on the H200)."""
    return max(1, min(n_sockets, 4))


def tag_to_wire(tag: FrameTag) -> list:
    return [tag.source, tag.seq, tag.run, tag.timestamp_ns, tag.meta, tag.received_at]


def tag_from_wire(item: list) -> FrameTag:
    return FrameTag(*item)


class _Filler:
    """Copies accepted frames into the held slot; sends full or due batches to the GPU process."""

    def __init__(self, ring: SharedRing, row: int, conn: Connection, max_delay_s: float, reject_log_s: float):
        self.ring, self.row, self.conn = ring, row, conn
        self.counters = ring.counters[row]
        self.max_delay_s = max_delay_s
        self.spare: list[int] = []
        self.slot_index: int | None = None
        self.tags: list[list] = []
        self.opened_at = 0.0
        self._reject_log = RateLimitedLog(reject_log_s)
        self.stop_requested = False
        self._reason_col = {r: REJECTED0 + i for i, r in enumerate(INGEST_REASONS)}

    def has_room(self) -> bool:
        return self.slot_index is not None or bool(self.spare)

    def send(self, msg: list) -> None:
        self.conn.send_bytes(msgpack.packb(msg, use_bin_type=True))

    def take(self, msg: list) -> None:
        """A message from the GPU process."""
        if msg[0] == "slot":
            self.spare.append(msg[1])
        elif msg[0] == "stop":
            self.stop_requested = True

    # FrameOut (sources/base.py): the sources write frames straight into the held slot
    def slot(self) -> np.ndarray:
        if self.slot_index is None:
            t0 = time.monotonic_ns()
            while not self.spare:  # one message can hold several frames (lclstreamer batches)
                self.take(msgpack.unpackb(self.conn.recv_bytes(), raw=False))
            self.counters[SLOT_WAIT_NS] += time.monotonic_ns() - t0
            self.slot_index = self.spare.pop()
            self.opened_at = time.monotonic()
        return self.ring.slots[self.slot_index][len(self.tags)]

    def commit(self, tag: FrameTag) -> None:
        self.counters[FRAMES] += 1
        self.tags.append(tag_to_wire(tag))
        if len(self.tags) == self.ring.batch:
            self.flush()

    def control(self, event: ControlEvent) -> None:
        self.counters[CONTROLS] += 1
        self.send(["control", {"type": event.type, "source": event.source, "run": event.run,
                               "count": event.count}])

    def on_reject(self, reason: str, detail: str) -> None:
        self.counters[self._reason_col[reason]] += 1
        if self._reject_log.should_log(reason):
            log.warning("frame_rejected", reason=reason, detail=detail, ingest=self.row,
                        suppressed=self._reject_log.take_suppressed(reason))

    def _due(self, now: float) -> bool:
        """The open batch should go: old enough, and the device is not busy (or it waited long)."""
        age = now - self.opened_at
        return age >= self.max_delay_s and (int(self.ring.in_flight[0]) < BUSY_BATCHES or age >= HOLD_MAX_S)

    def flush_due(self, now: float) -> None:
        if self.slot_index is not None and self._due(now):
            self.flush()

    def ms_until_due(self, now: float) -> int:
        if self.slot_index is None:
            return 50
        if now - self.opened_at >= self.max_delay_s:  # held while the device is busy
            return BUSY_POLL_MS
        return max(0, min(50, int((self.opened_at + self.max_delay_s - now) * 1e3) + 1))

    def flush(self) -> None:
        if self.slot_index is None:
            return
        slot, tags = self.slot_index, self.tags
        self.slot_index, self.tags = None, []
        self.send(["batch", slot, len(tags), tags])

    def finish(self) -> None:
        """Send the open batch, give back the spare slots, say done."""
        self.flush()
        for index in self.spare:
            self.send(["return", index])
        self.spare = []
        self.send(["done"])


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def ingest_main(cfg: Config, row: int, specs: list[SocketSpec], ring_args: tuple, conn: Connection,
                parent_pid: int) -> None:
    """The body of one ingest process (see the module docstring)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the GPU process says when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(cfg.logging)
    ring = SharedRing(*ring_args, create=False)
    filler = _Filler(ring, row, conn, cfg.pipeline.max_batch_delay_ms / 1e3, cfg.ingest.reject_log_interval_s)
    ctx = zmq.Context()
    guard = SocketGuard(cfg.security, ctx)  # CURVE, and counts of refused and dropped peers
    readers: list[SocketReader] = []
    try:
        try:
            for spec in specs:
                readers.append(SocketReader(ctx, spec.cfg, spec.endpoint, tuple(cfg.pipeline.frame_shape),
                                            cfg.pipeline.dtype, filler, filler.on_reject, secure=guard.secure))
        except OSError as exc:
            filler.send(["error", str(exc)])
            log.error("ingest_start_failed", ingest=row, error=str(exc))
            return
        filler.send(["ready"])
        log.info("ingest_started", ingest=row, pid=os.getpid(), endpoints=[s.endpoint for s in specs])
        _loop(filler, readers, conn, parent_pid, cfg.shutdown.drain_s, guard)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the GPU process is gone; so are we
    finally:
        for r in readers:
            r.close()
        guard.close()
        ctx.term()
        ring.close()


def _loop(filler: _Filler, readers: list[SocketReader], conn: Connection, parent_pid: int,
          drain_s: float, guard: SocketGuard) -> None:
    full = zmq.Poller()
    only_conn = zmq.Poller()
    for p in (full, only_conn):
        p.register(conn.fileno(), zmq.POLLIN)
    by_socket = {r.socket: r for r in readers}
    for sock in by_socket:
        full.register(sock, zmq.POLLIN)
    counters = filler.counters
    drain_until: float | None = None
    while True:
        now = time.monotonic()
        counters[HEARTBEAT_NS] = time.monotonic_ns()
        counters[AUTH_FAILURES], counters[DISCONNECTS] = guard.auth_failures, guard.disconnects
        poller = full if filler.has_room() else only_conn
        waited = time.monotonic_ns()
        events = dict(poller.poll(filler.ms_until_due(now) if drain_until is None else DRAIN_IDLE_MS))
        if poller is only_conn:  # no slot to fill: the sockets' queues fill meanwhile
            counters[SLOT_WAIT_NS] += time.monotonic_ns() - waited
        if conn.fileno() in events:
            while conn.poll():
                filler.take(msgpack.unpackb(conn.recv_bytes(), raw=False))
        if filler.stop_requested and drain_until is None:
            drain_until = time.monotonic() + drain_s
        if os.getppid() != parent_pid:
            return
        took = 0
        for sock, reader in by_socket.items():
            if sock not in events:
                continue
            for _ in range(RECV_BURST):
                if not filler.has_room():
                    break
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                reader.handle(parts, time.perf_counter())
                took += 1
        now = time.monotonic()
        filler.flush_due(now)
        if drain_until is not None:
            # Stopping: the sockets' queues are drained when a poll finds nothing to take (or the
            # drain time is up); what was taken is handed over, then the process finishes.
            idle = poller is full and took == 0 and not any(s in events for s in by_socket)
            if idle or now >= drain_until:
                filler.finish()
                return


class IngestProcess:
    """The GPU process's handle on one ingest process: start, message, stop, kill."""

    def __init__(self, row: int, specs: list[SocketSpec]):
        self.row, self.specs = row, specs
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.outstanding: set[int] = set()  # slots given and not yet returned
        self.got = 0  # frames received from it in batches (this incarnation)
        self.done = False  # said "done" after a stop
        self.restart_at: float | None = None  # when to start it again after a crash
        self.starts = 0
        self.quick_deaths = 0  # crashes in a row without handing over a batch (restart back-off)

    def start(self, cfg: Config, ring: SharedRing) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=ingest_main, name=f"peaknet-ingest-{self.row}", daemon=True,
                                   args=(cfg, self.row, self.specs, ring.attach_args(), child, os.getpid()))
        self.process.start()
        child.close()
        self.conn = parent
        self.outstanding, self.got, self.done = set(), 0, False
        self.restart_at = None
        self.starts += 1

    def send(self, msg: list) -> None:
        assert self.conn is not None
        self.conn.send_bytes(msgpack.packb(msg, use_bin_type=True))

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def wants_slot(self) -> bool:
        return self.alive() and not self.done and len(self.outstanding) < SLOTS_WANTED

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def join(self, timeout: float) -> None:
        if self.process is not None:
            self.process.join(timeout)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
