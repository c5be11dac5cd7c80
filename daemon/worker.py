"""One pipeline worker: ingest threads -> batch assembler -> Pipeline -> result thread -> sinks.

A `Worker` is plain Python so it can be tested without Ray; `actor.py` wraps it as the Ray actor
(one per GPU). Threads:
- one `SocketReader` per configured socket thread: receive, validate, copy into the pinned slot;
- a timer that releases partial batches after `max_batch_delay_ms`;
- the result thread: collects finished batches in order and hands per-frame results to sinks.
Every received frame ends in a result or a counted rejection, also on `stop()`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
import uuid
from collections import Counter, deque
from typing import Any, Callable

import numpy as np
import zmq

from .batching import BatchAssembler
from .config import Config, OutputConfig, SocketConfig
from .ingest import FrameTag, SocketReader, socket_endpoint
from .log import RateLimitedLog, get_logger
from .metrics import process_rss_bytes
from .pipeline import BatchFailed, Pipeline
from .results import BatchResult, FramePeaks
from .security import SocketGuard
from .sinks.cxi_runs import CxiRunWriters
from .sinks.results_stream import ResultStream
from .wire import Header

log = get_logger("peaknet.worker")
SAMPLES_KEPT = 100_000  # latency and batch-size samples held between two stats() calls


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


class Worker:
    """See the module docstring. `ingest=False` builds a worker for the library API only."""

    def __init__(self, cfg: Config, index: int = 0, ingest: bool = True):
        self.cfg, self.index = cfg, index
        self.name = f"{socket.gethostname()}/{index}"
        self.incarnation = uuid.uuid4().hex[:12]
        self.pipeline = Pipeline(cfg)
        self._warm_up()
        self._stats_lock = threading.Lock()
        self._received = 0
        self._processed = 0
        self._peaks = 0
        self._hits = 0
        self._rejected: Counter[str] = Counter()
        self._sink_errors: Counter[str] = Counter()
        self._runs: dict[tuple[str, Any], list[int]] = {}  # (source, run) -> [processed, min seq, max seq]
        self._controls: list[dict] = []
        # Samples for the histograms until the next stats() call; bounded, so a worker nobody
        # polls (the library API) does not grow with the frames it processes.
        self._batch_sizes: deque[int] = deque(maxlen=SAMPLES_KEPT)
        self._latencies: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self._reject_log = RateLimitedLog(cfg.ingest.reject_log_interval_s)
        self._stop_ingest = threading.Event()
        self._give_up = threading.Event()
        self._stop_results = threading.Event()
        self._cxi = (CxiRunWriters(cfg, f"w{index}-{self.incarnation[:6]}", lambda exc: self._sink_error("cxi", exc),
                                   queue_frames=2 * cfg.pipeline.batch_size) if cfg.output.cxi_dir else None)
        self._ctx = zmq.Context()
        self._guard = SocketGuard(cfg.security, self._ctx)  # issue 11: CURVE + refused-peer counts
        self._stream = (ResultStream(self._results_cfg(), self._ctx, secure=self._guard.secure)
                        if cfg.output.results_endpoint else None)
        self._assembler = BatchAssembler(self.pipeline, cfg.pipeline.max_batch_delay_ms / 1e3, self._give_up)
        self._readers: list[SocketReader] = []
        self._ingest_threads: list[threading.Thread] = []  # readers and the batch timer
        self._result_threads: list[threading.Thread] = []
        self.endpoints: list[str] = []
        self._library_lock = threading.Lock()
        if ingest:
            self._start_ingest()
            self._result_threads.append(self._start_thread(self._result_loop, "results"))
        log.info("worker_started", worker=self.name, pid=os.getpid(), device=str(self.pipeline.device),
                 pinned_bytes=self.pipeline.pinned_bytes, endpoints=self.endpoints,
                 incarnation=self.incarnation)

    # ------------------------------------------------------------------ setup
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

    def _results_cfg(self) -> OutputConfig:
        """In bind mode actor i binds the results port + i, like the ingest sockets."""
        out = self.cfg.output
        if not out.results_bind:
            return out
        endpoint = socket_endpoint(SocketConfig(endpoint=out.results_endpoint, mode="bind"), self.index)
        return dataclasses.replace(out, results_endpoint=endpoint)

    def _start_ingest(self) -> None:
        shape = tuple(self.cfg.pipeline.frame_shape)
        for sock in self.cfg.ingest.sockets:
            endpoint = socket_endpoint(sock, self.index)
            self.endpoints.append(endpoint)
            for _ in range(sock.threads if sock.mode == "connect" else 1):
                self._readers.append(SocketReader(self._ctx, sock, endpoint, shape, self.cfg.pipeline.dtype,
                                                  self._on_frame, self._on_control, self._on_reject,
                                                  secure=self._guard.secure))
            if sock.mode == "bind" and sock.threads > 1:
                log.warning("bind_socket_single_thread", endpoint=endpoint,
                            detail="a bound endpoint is served by one thread; use several endpoints")
        for i, reader in enumerate(self._readers):
            self._ingest_threads.append(self._start_thread(lambda r=reader: r.run(self._stop_ingest), f"ingest-{i}"))
        self._ingest_threads.append(self._start_thread(self._timer_loop, "batch-timer"))

    def _start_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"{name}-{self.index}", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ ingest callbacks
    def _on_frame(self, frame: np.ndarray, tag: FrameTag) -> None:
        with self._stats_lock:
            self._received += 1
        if not self._assembler.put(frame, tag):
            self._on_reject("shutdown", f"{tag.source}#{tag.seq} arrived after slots were released")

    def _on_control(self, header: Header) -> None:
        event = {"type": header.type, "source": header.source, "run": header.run,
                 "count": header.count, "worker": self.name}
        with self._stats_lock:
            self._controls.append(event)
        log.info("run_" + header.type, **event)

    def _on_reject(self, reason: str, detail: str) -> None:
        with self._stats_lock:
            self._rejected[reason] += 1
        if self._reject_log.should_log(reason):
            log.warning("frame_rejected", reason=reason, detail=detail, worker=self.name,
                        suppressed=self._reject_log.take_suppressed(reason))

    def _timer_loop(self) -> None:
        period = max(self.cfg.pipeline.max_batch_delay_ms / 4e3, 0.001)
        while not self._stop_ingest.wait(period):
            self._assembler.flush_due()

    # ------------------------------------------------------------------ results
    def _keep_input(self, peaks: FramePeaks) -> bool:
        """Which frames' data the CXI writer needs (copied out before the slot is reused)."""
        out = self.cfg.output
        if not out.cxi_dir or out.save_frames == "none":
            return False
        return out.save_frames == "all" or peaks.n_peaks >= out.hit_threshold

    def _collect(self, block: bool) -> list[BatchResult]:
        """Finished batches; a batch the device failed on is counted and logged, never fatal."""
        try:
            return self.pipeline.collect(block=block, timeout=0.1 if block else None, keep_inputs=self._keep_input)
        except BatchFailed as exc:
            with self._stats_lock:
                self._rejected["pipeline_error"] += len(exc.tags)
            log.error("batch_failed", error=str(exc), worker=self.name,
                      frames=[(t.source, t.seq) for t in exc.tags])
            return []

    def _result_loop(self) -> None:
        while not self._stop_results.is_set():
            for batch in self._collect(block=True):
                try:
                    self._handle_batch(batch)
                except Exception as exc:  # the result thread must outlive any bad batch
                    self._sink_error("result_thread", exc)

    def _handle_batch(self, batch: BatchResult, deliver: bool = True) -> None:
        out = self.cfg.output
        inputs = batch.inputs
        peaks_total = hits = 0
        for i, (tag, peaks) in enumerate(zip(batch.tags, batch.frames)):
            result = frame_result(tag, peaks, out.hit_threshold, self.name, batch.done_at)
            peaks_total += peaks.n_peaks
            hits += result["hit"]
            if deliver:
                self._deliver(result, None if inputs is None else inputs[i])
            with self._stats_lock:
                self._latencies.append(result["latency_ms"] / 1e3)
                tally = self._runs.setdefault((tag.source, tag.run), [0, tag.seq, tag.seq])
                tally[0] += 1
                tally[1], tally[2] = min(tally[1], tag.seq), max(tally[2], tag.seq)
        with self._stats_lock:
            self._processed += len(batch.frames)
            self._peaks += peaks_total
            self._hits += hits
            self._batch_sizes.append(len(batch.frames))

    def _deliver(self, result: dict, frame: np.ndarray | None) -> None:
        if self._cxi is not None:
            self._cxi.mark(result)  # issue 11: result['truncated'] before anyone sees the result
        if self._stream is not None:
            try:
                self._stream.send(result)
            except Exception as exc:  # a results consumer must never take the worker down
                self._sink_error("results", exc)
        if self._cxi is not None:
            self._cxi.put(result, frame)

    def _sink_error(self, sink: str, exc: Exception) -> None:
        with self._stats_lock:
            self._sink_errors[sink] += 1
        if self._reject_log.should_log("sink:" + sink):
            log.error("sink_error", sink=sink, error=str(exc), worker=self.name)

    # ------------------------------------------------------------------ control (actor methods)
    def ready(self) -> dict:
        return {"worker": self.name, "pid": os.getpid(), "endpoints": self.endpoints,
                "device": str(self.pipeline.device), "incarnation": self.incarnation,
                "pinned_bytes": self.pipeline.pinned_bytes}

    def stats(self) -> dict:
        """Cumulative counters plus the batch sizes and latencies seen since the last call."""
        with self._stats_lock:
            batch_sizes, latencies = list(self._batch_sizes), list(self._latencies)
            self._batch_sizes.clear()
            self._latencies.clear()
            return {
                "actor": self.name, "index": self.index, "incarnation": self.incarnation, "pid": os.getpid(),
                "received": self._received, "processed": self._processed, "peaks": self._peaks,
                "hits": self._hits, "rejected": dict(self._rejected), "sink_errors": dict(self._sink_errors),
                "runs": [[s, r, *tally] for (s, r), tally in self._runs.items()], "controls": list(self._controls),
                "batch_sizes": batch_sizes, "latencies_s": latencies,
                "rss_bytes": process_rss_bytes(),
                **self._integrity_stats(),
                "device_mem_bytes": self._device_memory(),
            }

    def _integrity_stats(self) -> dict:
        """Issue 11 counters: CXI truncation, results dropped (PUB), refused peers."""
        return {"peaks_truncated": self._cxi.peaks_truncated if self._cxi is not None else 0,
                "results_dropped": dict(self._stream.dropped) if self._stream is not None else {},
                "auth_failures": self._guard.auth_failures, "peer_disconnects": self._guard.disconnects}

    def _device_memory(self) -> int:
        import torch
        dev = self.pipeline.device
        return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else 0

    def close_run(self, run: Any) -> list[str]:
        """Close the CXI file of a finished run; returns this worker's completed files of it."""
        return self._cxi.close_run(run) if self._cxi is not None else []

    def stop(self) -> dict:
        """Stop receiving, finish every received frame, flush and close sinks; final stats."""
        self._stop_ingest.set()
        for thread in self._ingest_threads:
            thread.join()
        self._assembler.flush()
        self._stop_results.set()
        for thread in self._result_threads:
            thread.join()
        for batch in self.pipeline.drain():
            self._handle_batch(batch)
        self._give_up.set()
        if self._cxi is not None:
            self._cxi.close()
        if self._stream is not None:
            self._stream.close()
        self.pipeline.close()
        self._guard.close()
        self._ctx.term()
        final = self.stats()
        log.info("worker_stopped", worker=self.name, received=final["received"],
                 processed=final["processed"], rejected=sum(final["rejected"].values()))
        return final

    # ------------------------------------------------------------------ library API
    def process_batch(self, frames: np.ndarray) -> list[dict]:
        """Run (B, P, H, W) or (P, H, W) frames through the pipeline and return per-frame
        results (library API; only on a worker built with ingest=False)."""
        if self._readers:
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
            self._received += len(frames)
        results = []
        for batch in done:
            self._handle_batch(batch, deliver=False)
            results.extend(frame_result(tag, peaks, self.cfg.output.hit_threshold, self.name, batch.done_at)
                           for tag, peaks in zip(batch.tags, batch.frames))
        return results
