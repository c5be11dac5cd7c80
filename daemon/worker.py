"""One pipeline worker (the body of a GPU's actor): ingest processes -> Pipeline -> sinks.

```
ingest processes (N)            GPU process (this)
  PULL sockets                    slots thread:    free pipeline slot -> an ingest process
  validate, copy into  --slot-->  dispatch thread: batch of slot i -> Pipeline.submit (H2D)
  a shared batch slot  <--slot--  launcher thread: detect + extract + D2H (CUDA only)
                                  results thread:  collect -> results sender process (pipe),
                                                   CXI writer thread
```

A `Worker` is plain Python so it can be tested without Ray; `actor.py` wraps it as the Ray actor.
Every thread runs under `Supervision` (failures logged, counted, the frames they held counted
as `internal_error`, the thread restarted); a dead ingest process is counted the same way and
started again. Every frame taken off a socket ends in exactly one of: a result, a counted
rejection, or (only when this whole process dies) a loss the supervisor counts from the tally
file this worker rewrites after every batch and the results sender's final count. `stop()`
drains the sockets' queues and is bounded by `shutdown.timeout_s`.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any, Optional

import msgpack
import numpy as np
import zmq

from .accounting import count_in_run, run_rows, write_tally_file
from .config import Config
from .ingest import FrameTag, socket_endpoint
from .ingest_process import IngestProcess, SocketSpec, default_processes, plan_sockets, tag_from_wire
from .log import RateLimitedLog, get_logger
from .metrics import process_rss_bytes
from .monitor import HitSampler
from .pipeline import BatchFailed, Pipeline
from .results import BatchResult, FramePeaks
from .shm_ring import (AUTH_FAILURES, COLUMNS, CONTROLS, DISCONNECTS, FRAMES, HEARTBEAT_NS, INGEST_REASONS,
                       REJECTED0, SLOT_WAIT_NS, SharedRing)
from .security import SocketGuard
from .sinks import SINKS, ResultSink, SinkContext
from .supervision import Supervision

log = get_logger("peaknet.worker")
SAMPLES_KEPT = 100_000  # latency and batch-size samples held between two stats() calls
CONTROLS_KEPT = 1024  # control events held between two stats() calls
FRAME_REASONS = ("internal_error", "pipeline_error", "shutdown", "non_finite")  # rejections of frames already counted in
INGEST_START_S = 60.0  # an ingest process must report its sockets open within this


def frame_result(tag: FrameTag, peaks: FramePeaks, hit_threshold: int, worker: str,
                 done_at: float) -> dict[str, Any]:
    """A `peaknet-result/1` record for one frame."""
    return {
        "source": tag.source, "seq": tag.seq, "run": tag.run, "timestamp_ns": tag.timestamp_ns,
        "n_peaks": peaks.n_peaks, "hit": peaks.n_peaks >= hit_threshold,
        "peaks": {"panel": peaks.panel, "y": peaks.y, "x": peaks.x,
                  "intensity": peaks.intensity, "npix": peaks.npix},
        "latency_ms": (done_at - tag.received_at) * 1e3, "worker": worker,
        "overflow": peaks.overflow, "meta": tag.meta,
    }


def tally_path(tally_dir: str, index: int, incarnation: str) -> Path:
    """Where a worker keeps its running tally (read by the supervisor after a crash)."""
    return Path(tally_dir) / f"actor-{index}-{incarnation}.msgpack"


def sent_path(tally_dir: str, index: int, incarnation: str) -> Path:
    """Where the worker's results sender writes what it sent (sinks/results_sender.py)."""
    return Path(tally_dir) / f"actor-{index}-{incarnation}.sent.msgpack"


class Worker:
    """See the module docstring. `ingest=False` builds a worker for the library API only.
    `tally_dir`: where to rewrite the tally file after every batch (None: no file)."""

    def __init__(self, cfg: Config, index: int = 0, ingest: bool = True, tally_dir: Optional[str] = None):
        self.cfg, self.index = cfg, index
        self.name = f"{socket.gethostname()}/{index}"
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = time.monotonic()
        self.supervision = Supervision(self.name, cfg.health.max_thread_restarts)
        self._stats_lock = threading.Lock()
        self._processed = 0
        self._peaks = 0
        self._hits = 0
        self._rejected: Counter[str] = Counter()  # frame rejections decided here (FRAME_REASONS)
        self._sink_errors: Counter[str] = Counter()
        self._sinks: dict[str, ResultSink] = {}  # in SINKS order
        self._runs: OrderedDict[tuple[str, Any], list[int]] = OrderedDict()  # -> [processed, min seq, max seq]
        self._controls: deque[dict] = deque(maxlen=CONTROLS_KEPT)
        self._controls_dropped = 0
        self._batch_sizes: deque[int] = deque(maxlen=SAMPLES_KEPT)
        self._latencies: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self._last_batch_done = time.monotonic()
        self._reject_log = RateLimitedLog(cfg.ingest.reject_log_interval_s)
        self._tally_file = tally_path(tally_dir, index, self.incarnation) if tally_dir else None
        self._tally_lock = threading.Lock()  # dispatch (controls) and results (batches) both write it
        self._gauge_lock = threading.Lock()  # dispatch and results both publish the in-flight gauge
        self._stopping = threading.Event()
        self._done = threading.Event()  # set when the result thread may finish (everything collected)
        self._monitor = HitSampler(cfg.monitor, cfg.output.hit_threshold) if cfg.monitor.enabled else None
        self._library_lock = threading.Lock()
        self._library_frames = 0
        self._dispatch_over = threading.Event()  # the dispatch thread has handed over its last batch
        self._held_batch: Optional[tuple[list, int]] = None  # dispatch: tags of a batch being submitted
        self._held_results: Optional[list] = None  # results: tags of a batch not yet counted
        self._shutdown_left = 0  # frames stop() counted as `shutdown` while the results thread ran on
        self.endpoints: list[str] = []
        self._children: list[IngestProcess] = []
        self._children_lock = threading.Condition()
        self._retired = np.zeros(COLUMNS, dtype=np.int64)  # counters of ingest processes that died
        self.ring: Optional[SharedRing] = None
        specs = self._socket_specs() if ingest else []
        if ingest:
            groups = plan_sockets(specs, cfg.ingest.processes or default_processes(len(specs)))
            self._children = [IngestProcess(i, g) for i, g in enumerate(groups)]
            n_slots = cfg.pipeline.buffers + 2 * len(groups)
            self.ring = SharedRing.create(n_slots, cfg.pipeline.batch_size, cfg.pipeline.frame_shape,
                                          cfg.pipeline.dtype, rows=len(groups))
        try:
            self.pipeline = Pipeline(cfg, host_inputs=self.ring.slots if self.ring else None,
                                     spawn=self.supervision.spawn)
            self.pinned_bytes = self.pipeline.pinned_bytes
            if self.ring is not None and self.pipeline.cuda:
                if self.ring.pin():
                    self.pinned_bytes += self.ring.nbytes
                else:
                    log.warning("ring_not_pinned", worker=self.name, detail="H2D copies run at pageable speed")
            self._warm_up()
            self._ctx = zmq.Context()
            self._guard = SocketGuard(cfg.security, self._ctx)  # CURVE on sink sockets; refused peers
            sent = str(sent_path(tally_dir, index, self.incarnation)) if tally_dir else None
            context = SinkContext(self.name, index, f"w{index}-{self.incarnation[:6]}", self._ctx,
                                  self._guard.secure, self.supervision.spawn, self._sink_error, sent)
            for name, build in SINKS.items():
                sink = build(cfg, context)
                if sink is not None:
                    self._sinks[name] = sink
            if ingest:
                self._start_ingest()
        except BaseException:
            for sink in self._sinks.values():
                sink.close(0.0)
            self._close_resources()
            raise
        log.info("worker_started", worker=self.name, pid=os.getpid(), device=str(self.pipeline.device),
                 pinned_bytes=self.pinned_bytes, endpoints=self.endpoints, incarnation=self.incarnation,
                 ingest_processes=len(self._children), slots=len(self.pipeline.slots))

    # ------------------------------------------------------------------ setup
    def _socket_specs(self) -> list[SocketSpec]:
        specs = []
        for sock in self.cfg.ingest.sockets:
            endpoint = socket_endpoint(sock, self.index)
            self.endpoints.append(endpoint)
            if sock.mode == "bind" and sock.threads > 1:
                log.warning("bind_socket_single_thread", endpoint=endpoint,
                            detail="a bound endpoint is served by one socket; use several endpoints")
            specs += [SocketSpec(sock, endpoint)] * (sock.threads if sock.mode == "connect" else 1)
        return specs

    def _warm_up(self, batches: int = 3) -> None:
        """A few batches through the pipeline before any frame arrives: torch.compile, cuDNN,
        CUDA graph recording (compile_mode reduce-overhead records on the calls after the
        first) and the caching allocator do their first-call work here, not on real frames."""
        t0 = time.perf_counter()
        for _ in range(batches):
            slot = self.pipeline.acquire()
            slot.frames[:] = 0
            self.pipeline.submit(slot, 1, [None])
            self.pipeline.drain()
        log.info("pipeline_warm", worker=self.name, seconds=round(time.perf_counter() - t0, 2))

    def _start_ingest(self) -> None:
        for child in self._children:
            self._start_child(child, wait=True)
        spawn = self.supervision.spawn
        spawn("results", self._result_loop, self._results_failed)
        spawn("dispatch", self._dispatch_loop, self._dispatch_failed)
        spawn("slots", self._slot_loop)

    def _start_child(self, child: IngestProcess, wait: bool) -> None:
        """Start an ingest process; with `wait`, until its sockets are open (errors raise OSError)."""
        assert self.ring is not None
        self.ring.counters[child.row] = 0
        child.start(self.cfg, self.ring)
        if not wait:
            return
        conn = child.conn
        assert conn is not None
        if not conn.poll(INGEST_START_S):
            child.kill()
            raise OSError(f"ingest process {child.row} did not start within {INGEST_START_S:.0f} s")
        try:
            msg = msgpack.unpackb(conn.recv_bytes(), raw=False)
        except EOFError:
            msg = ["error", f"exit code {child.process.exitcode if child.process else '?'}"]
        if msg[0] != "ready":
            child.kill()
            raise OSError(f"ingest process {child.row}: {msg[1]}")

    # ------------------------------------------------------------------ slots thread
    def _slot_loop(self) -> None:
        """Hands free pipeline slots to the ingest processes that want one."""
        while not self._done.is_set():
            slot = self.pipeline.acquire(timeout=0.1)
            if slot is None:
                continue
            given = False
            while not given and not self._done.is_set():
                with self._children_lock:
                    child = min((c for c in self._children if c.wants_slot()),
                                key=lambda c: len(c.outstanding), default=None)
                    if child is None:
                        self._children_lock.wait(0.1)
                        continue
                    child.outstanding.add(slot.index)
                    try:
                        child.send(["slot", slot.index])
                        given = True
                    except (OSError, ValueError):  # it died meanwhile; dispatch will notice
                        child.outstanding.discard(slot.index)
                        self._children_lock.wait(0.05)
            if not given:
                self.pipeline.release(slot)
            self.supervision.progress("slots")

    # ------------------------------------------------------------------ dispatch thread
    def _dispatch_loop(self) -> None:
        """Batches and control events from the ingest processes; notices their deaths."""
        while True:
            with self._children_lock:
                live = [c for c in self._children if c.conn is not None]
                waiting = [c for c in self._children if c.restart_at is not None]
            if not live and not waiting and self._stopping.is_set():
                self._dispatch_over.set()
                return
            self._restart_due(waiting)
            by_obj: dict[Any, IngestProcess] = {}
            for c in live:
                by_obj[c.conn] = c
                by_obj[c.process.sentinel] = c
            ready = multiprocessing.connection.wait(list(by_obj), timeout=0.1) if by_obj else []
            if not by_obj:
                time.sleep(0.05)  # nothing to wait on until a restart is due
            for obj in ready:
                child = by_obj[obj]
                if child.conn is None:
                    continue
                if obj is child.conn:
                    try:
                        data = child.conn.recv_bytes()
                    except (EOFError, OSError):
                        self._child_gone(child)
                        continue
                    self._on_message(child, msgpack.unpackb(data, raw=False))
                else:
                    while child.conn is not None and child.conn.poll():  # what it sent before dying
                        try:
                            self._on_message(child, msgpack.unpackb(child.conn.recv_bytes(), raw=False))
                        except (EOFError, OSError):
                            break
                    self._child_gone(child)
            self.supervision.progress("dispatch")

    def _on_message(self, child: IngestProcess, msg: list) -> None:
        kind = msg[0]
        if kind == "batch":
            _, index, n, wire_tags = msg
            tags = [tag_from_wire(t) for t in wire_tags]
            with self._children_lock:
                child.outstanding.discard(index)
                child.got += n
                child.quick_deaths = 0
                self._children_lock.notify_all()
            self._held_batch = (tags, index)
            self.pipeline.submit(self.pipeline.slots[index], n, tags)
            self._held_batch = None
            self._publish_in_flight()
        elif kind == "return":
            with self._children_lock:
                child.outstanding.discard(msg[1])
                self._children_lock.notify_all()
            self.pipeline.release(self.pipeline.slots[msg[1]])
        elif kind == "control":
            self._on_control(msg[1])
        elif kind == "done":
            with self._children_lock:
                child.done = True
                self._children_lock.notify_all()
        elif kind == "error":
            log.error("ingest_start_failed", worker=self.name, ingest=child.row, error=msg[1])

    def _dispatch_failed(self, exc: BaseException) -> None:
        held, self._held_batch = self._held_batch, None
        if held is None:
            return
        tags, index = held
        self._reject_frames("internal_error", len(tags), f"dispatch failed: {exc!r}")
        slot = self.pipeline.slots[index]
        if slot.state == "acquired":
            self.pipeline.release(slot)

    def _child_gone(self, child: IngestProcess) -> None:
        """An ingest process exited: count what it took and never handed over, free its slots,
        and start it again unless the worker is stopping."""
        assert self.ring is not None
        child.join(1.0)
        row = self.ring.counters[child.row].copy()
        lost = int(row[FRAMES]) - child.got
        exitcode = child.process.exitcode if child.process else None
        with self._children_lock:
            self._retired += row
            self.ring.counters[child.row] = 0
            slots, child.outstanding = list(child.outstanding), set()
            child.close()
            clean = child.done
            if not clean and not self._stopping.is_set():
                child.quick_deaths += 1
                child.restart_at = time.monotonic() + min(10.0, 0.5 * (child.quick_deaths - 1))
            self._children_lock.notify_all()
        for index in slots:
            self.pipeline.release(self.pipeline.slots[index])
        if lost > 0:
            self._reject_frames("internal_error", lost, f"ingest process {child.row} died holding them")
        if not clean:
            self.supervision.record_failure("ingest", f"ingest process {child.row} exited ({exitcode})")
            log.error("ingest_process_died", worker=self.name, ingest=child.row, exitcode=exitcode,
                      frames_lost=max(lost, 0), restarting=not self._stopping.is_set())

    def _restart_due(self, waiting: list[IngestProcess]) -> None:
        now = time.monotonic()
        for child in waiting:
            if child.restart_at is not None and now >= child.restart_at:
                try:
                    self._start_child(child, wait=False)
                    log.info("ingest_process_restarted", worker=self.name, ingest=child.row, starts=child.starts)
                except Exception as exc:
                    child.restart_at = now + 1.0
                    log.error("ingest_restart_failed", worker=self.name, ingest=child.row, error=str(exc))

    def _on_control(self, event: dict) -> None:
        event = {**event, "worker": self.name}
        with self._stats_lock:
            if len(self._controls) == self._controls.maxlen:
                self._controls_dropped += 1
            self._controls.append(event)
        log.info("run_" + str(event["type"]), **event)
        self._write_tally()

    def _reject_frames(self, reason: str, n: int, detail: str) -> None:
        with self._stats_lock:
            self._rejected[reason] += n
        if self._reject_log.should_log(reason):
            log.error("frames_rejected", reason=reason, frames=n, detail=detail, worker=self.name,
                      suppressed=self._reject_log.take_suppressed(reason))

    # ------------------------------------------------------------------ results thread
    def _keep_input(self, peaks: FramePeaks) -> bool:
        """Which frames' data a sink or the monitor needs (copied out before the slot is reused)."""
        n = peaks.n_peaks
        return ((self._monitor is not None and self._monitor.wants_frame(n))
                or any(sink.wants_frame(n) for sink in self._sinks.values()))

    def _collect(self, block: bool) -> list[BatchResult]:
        """Finished batches; a batch the device failed on is counted and logged, never fatal."""
        try:
            return self.pipeline.collect(block=block, timeout=0.1 if block else None, keep_inputs=self._keep_input)
        except BatchFailed as exc:
            self._last_batch_done = time.monotonic()
            self._reject_frames("pipeline_error", len(exc.tags), str(exc))
            return []

    def _publish_in_flight(self) -> None:
        """The ring's gauge, which the ingest processes read before sending a partial batch."""
        if self.ring is not None:
            with self._gauge_lock:  # read and write as one, so the last write is the latest count
                self.ring.in_flight[0] = self.pipeline.in_flight()

    def _result_loop(self) -> None:
        while True:
            batches = self._collect(block=True)
            if batches:
                self._publish_in_flight()
            for batch in batches:
                self._handle_batch(batch)
            self.supervision.progress("results")
            if not batches and self._dispatch_over.is_set() and self.pipeline.in_flight() == 0:
                return

    def _results_failed(self, exc: BaseException) -> None:
        """The frames the thread held, not yet taken by the first sink, end as `internal_error`."""
        held, self._held_results = self._held_results, None
        if held:
            self._reject_frames("internal_error", len(held), f"result thread failed: {exc!r}")

    def _handle_batch(self, batch: BatchResult, deliver: bool = True) -> None:
        """Turn a batch into results and hand them to the sinks (see `_deliver`); frames with
        NaN or Inf (found on the device) end as `non_finite` rejections."""
        out = self.cfg.output
        inputs = batch.inputs
        self._held_results = list(batch.tags)
        bad = set(batch.nonfinite)
        ready: list[tuple[dict, Optional[np.ndarray]]] = []
        for i, (tag, peaks) in enumerate(zip(batch.tags, batch.frames)):
            if i in bad:
                with self._stats_lock:
                    self._held_results.remove(tag)
                self._reject_frames("non_finite", 1, f"{tag.source}#{tag.seq}: NaN or Inf in the frame")
                continue
            result = frame_result(tag, peaks, out.hit_threshold, self.name, batch.done_at)
            cxi = self._sinks.get("cxi")
            if cxi is not None:  # the peaks its CXI row leaves out, before any sink sees the result
                cxi.mark(result)
            ready.append((result, None if inputs is None else inputs[i]))
        with self._stats_lock:
            self._batch_sizes.append(len(batch.frames))
        self._last_batch_done = time.monotonic()
        if deliver:
            self._deliver(ready)
        else:
            for result, _ in ready:
                self._count(result)
        if self._monitor is not None:
            for result, frame in ready:
                self._monitor.offer(result, frame)

    def _deliver(self, ready: list[tuple[dict, Optional[np.ndarray]]]) -> None:
        """The first sink (in SINKS order: the results stream) takes each result before it is
        counted, so a count never runs ahead of what left; then the tally file is rewritten and
        the other sinks get the batch."""
        sinks = list(self._sinks.items())
        for result, frame in ready:
            if sinks:
                self._put(*sinks[0], result, frame)
            self._count(result)
        self._write_tally()
        for name, sink in sinks[1:]:
            for result, frame in ready:
                self._put(name, sink, result, frame)

    def _put(self, name: str, sink: ResultSink, result: dict, frame: Optional[np.ndarray]) -> None:
        try:
            sink.put(result, frame if frame is not None and sink.wants_frame(result["n_peaks"]) else None)
        except Exception as exc:  # a sink's consumer or disk must never take the worker down
            self._sink_error(name, exc)

    def _count(self, result: dict) -> None:
        """One frame's result is out: count it, and let go of its tag."""
        with self._stats_lock:
            if self._held_results:
                self._held_results.pop(0)
            if self._shutdown_left:  # counted as `shutdown` by a stop that could not wait for it
                self._shutdown_left -= 1
                self._rejected["shutdown"] -= 1
                if not self._rejected["shutdown"]:
                    del self._rejected["shutdown"]
            self._processed += 1
            self._peaks += result["n_peaks"]
            self._hits += result["hit"]
            self._latencies.append(result["latency_ms"] / 1e3)
            count_in_run(self._runs, result["source"], result["run"], result["seq"])

    def _sink_error(self, sink: str, exc: BaseException) -> None:
        with self._stats_lock:
            self._sink_errors[sink] += 1
        if self._reject_log.should_log("sink:" + sink):
            log.error("sink_error", sink=sink, error=str(exc), worker=self.name)

    def _write_tally(self) -> None:
        """Rewrite the tally file (atomic rename): what the supervisor reads if we die."""
        if self._tally_file is None:
            return
        with self._stats_lock:
            data = {"index": self.index, "incarnation": self.incarnation, **self._counts(),
                    "results_sender": self._sender_pid(),
                    "runs": run_rows(self._runs), "controls": list(self._controls)}
        try:
            with self._tally_lock:
                write_tally_file(self._tally_file, data)
        except OSError as exc:
            self._sink_error("tally", exc)

    # ------------------------------------------------------------------ accounting and health
    def _ingest_counts(self) -> np.ndarray:
        """Counters of every ingest process, the dead ones included."""
        with self._children_lock:
            if self.ring is None:
                return self._retired.copy()
            return self._retired + self.ring.counters.sum(axis=0)

    def _counts(self) -> dict:
        """Cumulative counts (call with the stats lock held). `received` is every message taken
        off a socket except control messages (counted apart): a frame, or a rejected message.
        received == processed + sum(rejected) + in_flight holds at every moment."""
        c = self._ingest_counts()
        rejected = Counter({r: int(c[REJECTED0 + i]) for i, r in enumerate(INGEST_REASONS) if c[REJECTED0 + i]})
        rejected.update(self._rejected)
        frames_in = int(c[FRAMES]) + self._library_frames
        frame_rejections = sum(self._rejected[r] for r in FRAME_REASONS)
        message_rejections = sum(rejected.values()) - frame_rejections
        return {"received": frames_in + message_rejections, "frames_in": frames_in,
                "control_messages": int(c[CONTROLS]), "processed": self._processed, "rejected": dict(rejected),
                "in_flight": frames_in - self._processed - frame_rejections}

    def health(self) -> dict:
        """healthy: every role alive and frames moving. A stall is frames waiting while no batch
        finished for `health.stall_s`."""
        problems = [f"{role} thread dead" for role in self.supervision.dead()]
        with self._stats_lock:
            in_flight = self._counts()["in_flight"]
        idle = time.monotonic() - self._last_batch_done
        stalled = in_flight > 0 and idle >= self.cfg.health.stall_s
        if stalled:
            problems.append(f"{in_flight} frames waiting, no batch finished for {idle:.0f} s")
        with self._children_lock:
            for c in self._children:
                if not c.alive() and not c.done and c.restart_at is None:
                    problems.append(f"ingest process {c.row} down")
        return {"healthy": not problems, "stalled": stalled, "problems": problems}

    def _workers(self) -> dict:
        report = self.supervision.report()
        now_ns = time.monotonic_ns()
        with self._children_lock:
            for c in self._children:
                beat = int(self.ring.counters[c.row, HEARTBEAT_NS]) if self.ring is not None else 0
                report[f"ingest-{c.row}"] = {
                    "alive": c.alive(), "pid": c.process.pid if c.process else None, "starts": c.starts,
                    "failures": self.supervision.failures.get("ingest", 0),
                    "idle_s": round((now_ns - beat) / 1e9, 3) if beat else None}
        sender, process = self._sender()
        if process is not None:  # started again on the next result when it died
            report["results-sender"] = {"alive": process.is_alive(), "pid": process.pid,
                                        "starts": 1 + sender.restarts}
        return report

    # ------------------------------------------------------------------ control (actor methods)
    def ready(self) -> dict:
        return {"worker": self.name, "pid": os.getpid(), "endpoints": self.endpoints,
                "device": str(self.pipeline.device), "incarnation": self.incarnation,
                "pinned_bytes": self.pinned_bytes, "ingest_processes": len(self._children)}

    def stats(self) -> dict:
        """Cumulative counters plus the batch sizes, latencies and control events seen since
        the last call, worker liveness and health."""
        health = self.health()
        workers = self._workers()
        with self._stats_lock:
            batch_sizes, latencies = list(self._batch_sizes), list(self._latencies)
            controls = list(self._controls)
            self._batch_sizes.clear()
            self._latencies.clear()
            self._controls.clear()
            out = {
                "actor": self.name, "index": self.index, "incarnation": self.incarnation, "pid": os.getpid(),
                **self._counts(), "peaks": self._peaks, "hits": self._hits,
                "sink_errors": dict(self._sink_errors),
                "thread_failures": dict(self.supervision.failures),
                "runs": run_rows(self._runs), "controls": controls,
                "controls_dropped": self._controls_dropped,
                "batch_sizes": batch_sizes, "latencies_s": latencies,
                "rss_bytes": process_rss_bytes(), "device_mem_bytes": self._device_memory(),
                "ingest_rss_bytes": self._ingest_rss(), "sender_rss_bytes": self._sender_rss(),
                "health": health, "workers": workers,
                **self._integrity_stats(),
            }
        if self._monitor is not None:
            out["monitor"] = self._monitor.drain()  # the live page's side channel (daemon/monitor/)
        return out

    def _integrity_stats(self) -> dict:
        """CXI truncation, results not sent, refused peers, dropped ingest peers (the ingest
        processes count theirs in the shared counters) and the ingest processes' time without
        a free slot (the GPU side was behind)."""
        c = self._ingest_counts()
        dropped: Counter[str] = Counter()
        for sink in self._sinks.values():
            dropped.update(getattr(sink, "dropped", {}))
        return {"peaks_truncated": sum(getattr(s, "peaks_truncated", 0) for s in self._sinks.values()),
                "results_dropped": dict(dropped),
                "auth_failures": self._guard.auth_failures + int(c[AUTH_FAILURES])
                + sum(getattr(s, "auth_failures", 0) for s in self._sinks.values()),
                "peer_disconnects": self._guard.disconnects + int(c[DISCONNECTS])
                + sum(getattr(s, "disconnects", 0) for s in self._sinks.values()),
                "ingest_slot_wait_ms": int(c[SLOT_WAIT_NS]) // 1_000_000}

    def _ingest_rss(self) -> list[int]:
        """Resident memory of each ingest process (0 for one that is down)."""
        with self._children_lock:
            return [process_rss_bytes(c.process.pid) if c.alive() and c.process is not None else 0
                    for c in self._children]

    def _sender(self) -> tuple[Any, Any]:
        """The results stream's sink (sinks/results_sender.py) and its process; (None, None)
        without a results stream."""
        sender = self._sinks.get("results_stream")
        return sender, getattr(sender, "process", None)

    def _sender_pid(self) -> Optional[int]:
        """The results sender's pid (None without one): the supervisor waits for its count
        while it lives."""
        process = self._sender()[1]
        return None if process is None else process.pid

    def _sender_rss(self) -> int:
        """Resident memory of the results sender process (0 when there is none)."""
        process = self._sender()[1]
        return process_rss_bytes(process.pid) if process is not None and process.is_alive() else 0

    def _device_memory(self) -> int:
        import torch
        dev = self.pipeline.device
        return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else 0

    def close_run(self, run: Any, timeout: float = 60.0) -> list[str]:
        """Close the CXI file of a finished run; returns this worker's completed files of it."""
        files: list[str] = []
        for name, sink in self._sinks.items():
            try:
                files += sink.close_run(run, timeout)
            except Exception as exc:
                self._sink_error(name, exc)
        return files

    def stop(self, timeout: Optional[float] = None) -> dict:
        """Drain the sockets' queues, finish every frame received, flush and close the sinks;
        final stats. Every wait is bounded: all of it takes at most `shutdown.timeout_s`."""
        t0 = time.monotonic()
        deadline = t0 + (self.cfg.shutdown.timeout_s if timeout is None else timeout)
        self._stopping.set()
        with self._children_lock:
            for child in self._children:
                try:
                    child.send(["stop"])
                except (OSError, ValueError, AssertionError):
                    pass
            # the ingest processes drain, hand over their last batches and say done
            drained_by = min(deadline - 2.0, t0 + self.cfg.shutdown.drain_s + 2.0)
            self._children_lock.wait_for(lambda: all(c.done or c.conn is None for c in self._children),
                                         max(0.0, drained_by - time.monotonic()))
        for child in self._children:
            child.join(max(0.0, min(2.0, deadline - time.monotonic())))
            child.kill()
        self.supervision.stopping.set()
        if not self._children:
            self._dispatch_over.set()
        # dispatch ends once every ingest process is gone; then the slot thread stops, and the
        # results thread once everything in flight is collected. Time is left to close the
        # sinks: results still blocked on a consumer that is gone are then dropped (counted).
        roles = ("dispatch", "results")
        late = deadline - min(5.0, 0.25 * max(0.0, deadline - time.monotonic()))
        still = self.supervision.join(late, roles)
        if still:
            log.error("stop_threads_late", worker=self.name, roles=still)
            for sink in self._sinks.values():
                sink.close(0.0)  # unblocks a put waiting on a consumer that is gone
            still = self.supervision.join(deadline - 1.0, roles)
        self._done.set()
        self.supervision.join(deadline - 0.5, ("slots",))
        with self._stats_lock:  # a late result thread may still finish one: _count takes it back
            left = self._shutdown_left = max(0, self._counts()["in_flight"])
            if left:
                self._rejected["shutdown"] += left
        if left > 0:
            log.error("frames_rejected", reason="shutdown", frames=left, worker=self.name,
                      detail="not finished within shutdown.timeout_s")
        self._close_sinks(deadline)
        if left > 0:  # the sinks are closed: a late result thread's puts return at once
            self.supervision.join(deadline - 0.2, ("results",))
        self._close_resources()
        final = self.stats()
        self._write_tally()
        log.info("worker_stopped", worker=self.name, received=final["received"], processed=final["processed"],
                 rejected=sum(final["rejected"].values()), seconds=round(time.monotonic() - t0, 2))
        return final

    def _close_sinks(self, deadline: float) -> None:
        for name, sink in self._sinks.items():
            try:
                if not sink.close(max(0.5, min(deadline - time.monotonic() - 0.5, 30.0))):
                    self._sink_error(name, TimeoutError(f"the {name} sink did not finish within the stop time"))
            except Exception as exc:
                self._sink_error(name, exc)

    def _close_resources(self) -> None:
        self._done.set()
        for child in self._children:
            child.kill()
            child.join(1.0)
            child.close()
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.close()
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.term()
        if self.ring is not None:
            self._retired = self._ingest_counts()
            with self._children_lock:
                self.ring.close()
                self.ring = None

    # ------------------------------------------------------------------ library API
    def process_batch(self, frames: np.ndarray) -> list[dict]:
        """Run (B, P, H, W) or (P, H, W) frames through the pipeline and return per-frame
        results (library API; only on a worker built with ingest=False)."""
        if self._children:
            raise RuntimeError("process_batch is for library workers (ingest=False)")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        expected = tuple(self.cfg.pipeline.frame_shape)
        if frames.shape[1:] != expected:
            raise ValueError(f"frames of shape {tuple(frames.shape[1:])} do not match the configured {expected}")
        done: list[BatchResult] = []
        with self._library_lock:
            for start in range(0, len(frames), self.pipeline.batch_size):
                chunk = frames[start:start + self.pipeline.batch_size]
                slot = self.pipeline.acquire(timeout=0)
                while slot is None:
                    done.extend(self.pipeline.collect(block=True))
                    slot = self.pipeline.acquire(timeout=0)
                slot.frames[: len(chunk)] = chunk
                now = time.perf_counter()
                self.pipeline.submit(slot, len(chunk), [FrameTag("ray", start + i, 0, 0, {}, now)
                                                        for i in range(len(chunk))])
            done.extend(self.pipeline.drain())
        with self._stats_lock:
            self._library_frames += len(frames)
        results = []
        for batch in done:
            self._handle_batch(batch, deliver=False)
            results.extend(frame_result(tag, peaks, self.cfg.output.hit_threshold, self.name, batch.done_at)
                           for tag, peaks in zip(batch.tags, batch.frames))
        return results
