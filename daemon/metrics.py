"""Prometheus metrics for the daemon: a display of `Accounting.totals()` and the actors' gauges.

The arithmetic (totals over actor incarnations, restarts, losses, runs) belongs to
`accounting.py`; here cumulative totals only advance counters, and per-actor stats set gauges
and feed histograms. The registry belongs to the object, so tests and several daemons in one
process never share state.
"""

from __future__ import annotations

import os
import threading
import time
from socketserver import ThreadingMixIn
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from .log import get_logger

log = get_logger(__name__)

NS = "peaknet"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Accounting totals -> the counter they set.
_SCALARS = {"received": "frames_received", "processed": "frames_processed", "missing": "frames_missing",
            "peaks": "peaks_found", "hits": "hits", "control_messages": "control_messages",
            "restarts": "actor_restarts", "lost_in_restart": "frames_lost_in_restart",
            "peaks_truncated": "peaks_truncated", "auth_failures": "auth_failures",
            "peer_disconnects": "ingest_disconnects", "ingest_slot_wait_ms": "ingest_slot_wait_milliseconds"}
# Accounting's {label: n} totals -> (counter, label name).
_LABELLED = {"rejected": ("frames_rejected", "reason"), "sink_errors": ("sink_errors", "sink"),
             "thread_failures": ("thread_failures", "role"), "results_dropped": ("results_dropped", "reason")}


def process_rss_bytes(pid: int | None = None) -> int:
    """The resident set size of this process, or of `pid` (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics:
    """All daemon metrics in one registry, plus the HTTP endpoint that serves them."""

    def __init__(self, healthy: Callable[[], bool] | None = None, ready: Callable[[], bool] | None = None,
                 nvml: ModuleType | None = None, clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry(auto_describe=True)
        self.healthy = healthy or (lambda: True)
        self.ready = ready or (lambda: True)
        self._nvml, self._nvml_ok = nvml, None
        self._clock = clock
        self._lock = threading.Lock()
        self._rate_t: float | None = None
        self._rate_processed = 0.0
        self._rate_external = False
        self._server: WSGIServer | None = None
        self._mounts: dict[str, Callable] = {}  # path prefix -> WSGI app (e.g. /monitor)
        r = self.registry

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"{NS}_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"{NS}_{name}", doc, labels, registry=r)

        self.frames_received = counter("frames_received", "Messages taken off the ingest sockets: frames and "
                                                          "rejected messages (control messages apart)")
        self.frames_processed = counter("frames_processed", "Frames with a peak list produced")
        self.frames_rejected = counter("frames_rejected", "Messages or frames rejected, by reason", ["reason"])
        self.frames_missing = counter("frames_missing", "Frames of settled runs that gave no result")
        self.control_messages = counter("control_messages", "start/end messages received")
        self.peaks_found = counter("peaks_found", "Bragg peaks found")
        self.hits = counter("hits", "Frames with at least hit_threshold peaks")
        self.actor_restarts = counter("actor_restarts", "Pipeline actor restarts")
        self.frames_lost_in_restart = counter("frames_lost_in_restart",
                                              "Frames an actor had taken in and not finished when it died")
        self.sink_errors = counter("sink_errors", "Errors writing results, by sink", ["sink"])
        self.thread_failures = counter("thread_failures", "Worker threads and ingest processes that failed, "
                                                          "by role", ["role"])
        self.results_dropped = counter("results_dropped", "Results a sink did not deliver, by reason (results "
                                                          "stream pub: no_subscriber, hwm; closed at stop; CrystFEL live: "
                                                          "crystfel_queue_full, crystfel_closed, crystfel_bad_hit)",
                                ["reason"])
        self.peaks_truncated = counter("peaks_truncated", "Weakest peaks left out of CXI rows over the cap")
        self.auth_failures = counter("auth_failures", "Peers refused by CURVE (handshake failed)")
        self.ingest_disconnects = counter("ingest_disconnects", "Ingest peers disconnected (a part over "
                                          "max_message_bytes, or the peer went away)")
        self.ingest_slot_wait_milliseconds = counter(
            "ingest_slot_wait_milliseconds", "Time ingest processes had no free batch slot to fill (summed over "
            "them): the GPU side was behind, and the sockets' queues, then the source, were held back")
        self.batch_size = Histogram(f"{NS}_batch_size", "Frames per processed batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.latency_seconds = Histogram(f"{NS}_latency_seconds", "Frame receive to result",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.gpu_utilization = gauge("gpu_utilization_percent", "GPU utilisation", ["gpu"])
        self.gpu_memory_used = gauge("gpu_memory_used_bytes", "GPU memory used", ["gpu"])
        self.gpu_temperature = gauge("gpu_temperature_celsius", "GPU temperature", ["gpu"])
        self.actors_alive = gauge("actors_alive", "Pipeline actors that answered the last stats poll")
        self.rss_bytes = gauge("process_rss_bytes", "Resident memory, by process", ["process"])
        self.device_memory = gauge("device_memory_allocated_bytes", "torch device memory allocated, by actor",
                                   ["actor"])
        self.rate_fps = gauge("rate_fps", "Frames processed per second over the last stats interval")
        self.frames_in_flight = gauge("frames_in_flight", "Frames taken in and not yet finished, by actor", ["actor"])
        self.actor_healthy = gauge("actor_healthy", "1 while an actor's threads are alive and frames move", ["actor"])

    # ------------------------------------------------------------------------------------------
    # Feeding
    # ------------------------------------------------------------------------------------------

    def update(self, totals: dict, stats: Iterable[dict] = (), actors_alive: int | None = None) -> None:
        """Display `Accounting.totals()` (counters advance to them) and one poll's per-actor
        stats (gauges, histogram samples)."""
        with self._lock:
            for key, name in _SCALARS.items():
                if key in totals:
                    self._advance(getattr(self, name), f"{name}_total", totals[key])
            for key, (name, label) in _LABELLED.items():
                for value, n in (totals.get(key) or {}).items():
                    self._advance(getattr(self, name).labels(str(value)), f"{name}_total", n, {label: str(value)})
            alive = 0
            for s in stats:
                alive += 1
                actor = str(s.get("actor", s.get("index", "?")))
                for n in s.get("batch_sizes") or ():
                    self.batch_size.observe(n)
                for t in s.get("latencies_s") or ():
                    self.latency_seconds.observe(t)
                for key, gauge in (("rss_bytes", self.rss_bytes), ("device_mem_bytes", self.device_memory),
                                   ("in_flight", self.frames_in_flight)):
                    if key in s:
                        gauge.labels(actor).set(s[key])
                for i, rss in enumerate(s.get("ingest_rss_bytes") or ()):
                    self.rss_bytes.labels(f"{actor}/ingest{i}").set(rss)
                if s.get("sender_rss_bytes"):
                    self.rss_bytes.labels(f"{actor}/results").set(s["sender_rss_bytes"])
                if "health" in s:
                    self.actor_healthy.labels(actor).set(1 if s["health"].get("healthy") else 0)
            self.actors_alive.set(alive if actors_alive is None else actors_alive)
            self.rss_bytes.labels("supervisor").set(process_rss_bytes())
            if not self._rate_external:
                self._update_rate()

    def _advance(self, counter: Any, sample: str, total: int, labels: dict[str, str] | None = None) -> None:
        delta = int(total) - int(self.value(sample, labels))
        if delta > 0:
            counter.inc(delta)

    def set_rate(self, fps: float) -> None:
        """Set rate_fps from the caller's own measurement (then it is no longer computed here)."""
        self._rate_external = True
        self.rate_fps.set(max(0.0, float(fps)))

    def _update_rate(self) -> None:
        now, processed = self._clock(), self.value("frames_processed_total")
        if self._rate_t is not None and now > self._rate_t:
            self.rate_fps.set(max(0.0, processed - self._rate_processed) / (now - self._rate_t))
        self._rate_t, self._rate_processed = now, processed

    def update_gpus(self, indices: Sequence[int] | None = None) -> bool:
        """Refresh the per-GPU gauges from NVML; False (and no change) where NVML is unavailable."""
        nvml = self._nvml
        if self._nvml_ok is False:
            return False
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                self._nvml_ok = False
                return False
            self._nvml = nvml
        try:
            if not self._nvml_ok:
                nvml.nvmlInit()
                self._nvml_ok = True
            count = nvml.nvmlDeviceGetCount()
            for i in (range(count) if indices is None else indices):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                for gauge, read in ((self.gpu_utilization, lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                                    (self.gpu_memory_used, lambda: nvml.nvmlDeviceGetMemoryInfo(h).used),
                                    (self.gpu_temperature,
                                     lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))):
                    try:
                        value = read()
                    except nvml.NVMLError:
                        continue  # not supported on this GPU: leave the gauge out
                    gauge.labels(str(i)).set(value)
            return True
        except Exception as exc:
            if self._nvml_ok is None:
                self._nvml_ok = False  # no library / driver: stop trying
            log.debug("gpu metrics unavailable", error=str(exc))
            return False

    # ------------------------------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------------------------------

    def value(self, sample: str, labels: dict[str, str] | None = None) -> float:
        """One exported sample's value (0.0 when absent), e.g. value('peaknet_hits_total')."""
        name = sample if sample.startswith(NS + "_") else f"{NS}_{sample}"
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def _by_label(self, metric: str, label: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for fam in self.registry.collect():
            if fam.name == f"{NS}_{metric}":
                for smp in fam.samples:
                    if smp.name.endswith("_total"):
                        out[smp.labels[label]] = int(smp.value)
        return out

    def totals(self) -> dict[str, Any]:
        """The counters' current totals as plain data (for logs and tests)."""
        out: dict[str, Any] = {name: int(self.value(f"{name}_total")) for name in _SCALARS.values()}
        for _key, (name, label) in _LABELLED.items():
            out[name] = self._by_label(name, label)
        out["actors_alive"] = int(self.value("actors_alive"))
        out["rate_fps"] = self.value("rate_fps")
        return out

    # ------------------------------------------------------------------------------------------
    # HTTP
    # ------------------------------------------------------------------------------------------

    def mount(self, prefix: str, app: Callable) -> None:
        """Route `prefix` and everything under it to another WSGI app (before serve())."""
        self._mounts[prefix.rstrip("/")] = app

    def wsgi_app(self) -> Callable:
        """/metrics (Prometheus text), /healthz and /readyz (200 or 503 from the callables),
        and the mounted apps."""
        metrics_app = make_wsgi_app(self.registry)

        def probe(check: Callable[[], bool], start_response: Callable) -> list[bytes]:
            try:
                ok = bool(check())
            except Exception:
                ok = False
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ok\n"]

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path == "/healthz":
                return probe(self.healthy, start_response)
            if path == "/readyz":
                return probe(self.ready, start_response)
            if path in ("/metrics", "/"):
                return metrics_app(environ, start_response)
            for prefix, mounted in self._mounts.items():
                if path == prefix or path.startswith(prefix + "/"):
                    return mounted(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]

        return app

    def serve(self, host: str, port: int, healthy: Callable[[], bool] | None = None,
              ready: Callable[[], bool] | None = None) -> tuple[WSGIServer, int]:
        """Serve in a daemon thread; port 0 picks a free port. Returns (server, bound port)."""
        if healthy is not None:
            self.healthy = healthy
        if ready is not None:
            self.ready = ready
        server = make_server(host, port, self.wsgi_app(), _ThreadingWSGIServer, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        self._server = server
        bound = server.server_port
        log.info("metrics endpoint", url=f"http://{host}:{bound}/metrics")
        return server, bound

    def stop(self) -> None:
        """Stop the HTTP server (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._nvml_ok and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml_ok = None


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no access log
        pass
