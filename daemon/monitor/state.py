"""What the live page shows, accumulated in the supervisor from the actors' stats polls.

`MonitorState` takes per-frame summaries (source, seq, run, n_peaks, hit, latency_ms, peak
panel/y/x, and t, the wall time the actor finished the frame), a few downsampled hit frames, and
each poll's per-actor stats. It keeps, per run: totals, frames and hits per second over the last
`history_s`, a histogram of peaks per frame and the virtual powder (every peak position counted
in the slab layout, binned by `downsample`); and the latest `latest_hits` hits. Memory is bounded
by construction: at most MAX_RUNS runs (the oldest are forgotten), history_s seconds of series,
latest_hits images. All methods are thread-safe (the HTTP server reads while the supervisor
writes).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..config import MonitorConfig
from ..log import get_logger
from .images import encode_png, grid, tile, tile_positions, to_gray, to_heat

log = get_logger("peaknet.monitor")

MAX_RUNS = 8  # runs kept (totals, series, histogram, powder); the oldest is dropped first
MIN_SPAN_S = 30  # the rate plots span at least this many seconds
HIST_CAP = 4096  # peaks per frame beyond this count in the last histogram bin
GPU_GAUGES = {"peaknet_gpu_utilization_percent": "utilization_percent",
              "peaknet_gpu_memory_used_bytes": "memory_used_bytes",
              "peaknet_gpu_temperature_celsius": "temperature_celsius"}


def gpu_readings(registry: Any) -> list[dict]:
    """Per-GPU utilisation, memory and temperature from a Metrics registry's gauges."""
    by_gpu: dict[str, dict] = {}
    for family in registry.collect():
        key = GPU_GAUGES.get(family.name)
        for sample in family.samples if key else ():
            by_gpu.setdefault(sample.labels["gpu"], {"gpu": sample.labels["gpu"]})[key] = sample.value
    return [by_gpu[g] for g in sorted(by_gpu, key=lambda g: (len(g), g))]


def run_key(run: Any) -> str:
    return str(run)


@dataclass
class _Run:
    label: Any
    powder: np.ndarray  # (P, ceil(H/f), ceil(W/f)) peak counts
    frames: int = 0
    hits: int = 0
    peaks: int = 0
    first_t: float = math.inf
    last_t: float = -math.inf
    sources: set = field(default_factory=set)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HIST_CAP + 1, np.int64))
    seconds: dict = field(default_factory=dict)  # int(t) -> [frames, hits]
    powder_version: int = 0


@dataclass
class _Hit:
    id: int
    summary: dict
    image: np.ndarray  # (P, h, w) downsampled
    png: bytes | None = None


@dataclass
class _Actor:
    name: str
    t: float
    processed: int
    rate_fps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    received: int = 0
    rejected: dict = field(default_factory=dict)
    alive: bool = True
    restarts: int = 0
    dropped: int = 0


class MonitorState:
    """See the module docstring."""

    def __init__(self, cfg: MonitorConfig, frame_shape: Sequence[int], hit_threshold: int,
                 interval_s: float = 2.0, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.frame_shape = tuple(int(v) for v in frame_shape)
        p, h, w = self.frame_shape
        f = cfg.downsample
        self.small_shape = (p, -(-h // f), -(-w // f))
        self.hit_threshold = int(hit_threshold)
        self.interval_s = float(interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._next_hit = 0
        self._epoch = 0
        self._actors: dict[str, _Actor] = {}
        self._gpus: list[dict] = []
        self._missing = 0
        self._errors = 0  # side-channel summaries or payloads that could not be read
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._hits: deque[_Hit] = deque(maxlen=self.cfg.latest_hits)
        self._dropped = 0
        self._bad_peaks = 0  # peak positions outside the frame (dropped from the powder)
        self._bad_hits = 0  # hit images of the wrong shape (not shown)
        self._newest_t = -math.inf
        self._current: str | None = None

    # ------------------------------------------------------------------ feeding
    def update(self, stats: Iterable[dict], missing_total: int | None = None,
               gpus: list[dict] | None = None) -> None:
        """One supervisor poll: each actor's stats dict, with its 'monitor' side channel (from
        HitSampler.drain) when the actor has one."""
        stats = list(stats)
        self.update_actors(stats, missing_total, gpus)
        for s in stats:
            side = s.get("monitor")
            if not side:
                continue
            try:
                self.add_results(side.get("results", ()), dropped=int(side.get("dropped", 0)),
                                 actor=str(s.get("actor", "?")))
                for summary, image in side.get("hits", ()):
                    self.add_hit(summary, image)
            except Exception as exc:  # the page must never take the supervisor down
                with self._lock:
                    self._errors += 1
                log.warning("monitor_update_failed", actor=s.get("actor"), error=repr(exc))

    def add_results(self, summaries: Iterable[dict], dropped: int = 0, actor: str | None = None) -> None:
        """Per-frame summaries (see the module docstring); `dropped` more were not sent."""
        p, hb, wb = self.small_shape
        f = self.cfg.downsample
        with self._lock:
            self._dropped += dropped
            if actor is not None and actor in self._actors:
                self._actors[actor].dropped += dropped
            positions: dict[str, list[tuple]] = {}
            for s in summaries:
                try:  # everything is read before anything changes: a bad summary is skipped whole
                    key, t, n, hit, source = (run_key(s["run"]), float(s["t"]), int(s["n_peaks"]), bool(s["hit"]),
                                              str(s["source"]))
                    peaks = (np.asarray(s["panel"]), np.asarray(s["y"]), np.asarray(s["x"])) if n else None
                except (KeyError, TypeError, ValueError):
                    self._errors += 1
                    continue
                run = self._run(key, s["run"])
                run.frames += 1
                run.hits += hit
                run.peaks += n
                run.first_t, run.last_t = min(run.first_t, t), max(run.last_t, t)
                run.sources.add(str(source))
                run.histogram[min(n, HIST_CAP)] += 1
                bucket = run.seconds.setdefault(int(t), [0, 0])
                bucket[0] += 1
                bucket[1] += hit
                if t >= self._newest_t:
                    self._newest_t, self._current = t, key
                if peaks is not None:
                    positions.setdefault(key, []).append(peaks)
            for key, cols in positions.items():
                panel = np.concatenate([np.asarray(c[0], np.int64) for c in cols])
                y = np.floor(np.concatenate([np.asarray(c[1], np.float64) for c in cols]) + 0.5).astype(np.int64) // f
                x = np.floor(np.concatenate([np.asarray(c[2], np.float64) for c in cols]) + 0.5).astype(np.int64) // f
                ok = (panel >= 0) & (panel < p) & (y >= 0) & (y < hb) & (x >= 0) & (x < wb)
                self._bad_peaks += int((~ok).sum())
                run = self._runs[key]
                flat = np.ravel_multi_index((panel[ok], y[ok], x[ok]), self.small_shape)
                run.powder += np.bincount(flat, minlength=run.powder.size).reshape(self.small_shape).astype(
                    run.powder.dtype)
                run.powder_version += 1
            self._prune()

    def _run(self, key: str, label: Any) -> _Run:
        run = self._runs.get(key)
        if run is None:
            if len(self._runs) >= MAX_RUNS:
                oldest = min(self._runs, key=lambda k: self._runs[k].last_t)
                del self._runs[oldest]
            run = self._runs[key] = _Run(label=label, powder=np.zeros(self.small_shape, np.int64))
        return run

    def _prune(self) -> None:
        """Forget per-second bins older than history_s (bounded memory)."""
        horizon = int(self._clock() - self.cfg.history_s) - 1
        for run in self._runs.values():
            for sec in [s for s in run.seconds if s < horizon]:
                del run.seconds[sec]

    def add_hit(self, summary: dict, image: np.ndarray) -> None:
        """A hit's downsampled frame, (P, ceil(H/f), ceil(W/f)), with its summary."""
        image = np.asarray(image, np.float32)
        if image.shape != self.small_shape:
            with self._lock:
                self._bad_hits += 1
            return
        with self._lock:
            self._next_hit += 1
            hit = _Hit(self._next_hit, dict(summary), image)
            hits = sorted([*self._hits, hit], key=lambda h: float(h.summary["t"]))
            self._hits.clear()
            self._hits.extend(hits[-self.cfg.latest_hits:])

    def update_actors(self, stats: Iterable[dict], missing_total: int | None = None,
                      gpus: list[dict] | None = None) -> None:
        """Per-actor rate (from the change in 'processed' between polls), p50/p99 latency of the
        frames since the last poll, rejections by reason; the daemon's missing frames; GPUs."""
        now = self._clock()
        with self._lock:
            for s in stats:
                name = str(s.get("actor", s.get("index", "?")))
                processed = int(s.get("processed", 0))
                a = self._actors.get(name)
                if a is None:
                    a = self._actors[name] = _Actor(name, now, processed)
                elif now > a.t:
                    a.rate_fps = max(0, processed - a.processed) / (now - a.t)
                    a.t, a.processed = now, processed
                lat = s.get("latencies_s") or []
                if len(lat):
                    a.p50_ms, a.p99_ms = (float(np.percentile(lat, q)) * 1e3 for q in (50, 99))
                a.received = int(s.get("received", 0))
                a.rejected = {str(k): int(v) for k, v in (s.get("rejected") or {}).items()}
                a.alive = bool(s.get("alive", True))
                a.restarts = int(s.get("restarts", 0))
            if missing_total is not None:
                self._missing = int(missing_total)
            if gpus is not None:
                self._gpus = [dict(g) for g in gpus]

    def reset(self) -> None:
        """Forget the accumulated views (runs, series, histograms, powders, latest hits)."""
        with self._lock:
            self._reset_locked()
            self._epoch += 1

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws, as JSON-ready data (see README, Live monitor)."""
        now = self._clock()
        with self._lock:
            runs = sorted(self._runs.items(), key=lambda kv: kv[1].last_t, reverse=True)
            current = self._runs.get(self._current) if self._current else None
            p, hb, wb = self.small_shape
            rows, cols = grid(p)
            out = {
                "epoch": self._epoch, "time": now, "refresh_s": self.cfg.refresh_s,
                "hit_threshold": self.hit_threshold, "frame_shape": list(self.frame_shape),
                "downsample": self.cfg.downsample, "history_s": self.cfg.history_s,
                "totals": {"frames": sum(r.frames for _, r in runs), "hits": sum(r.hits for _, r in runs),
                           "peaks": sum(r.peaks for _, r in runs), "missing": self._missing,
                           "dropped": self._dropped, "bad_peaks": self._bad_peaks,
                           "bad_hits": self._bad_hits, "errors": self._errors},
                "current_run": self._current,
                "runs": [self._run_row(k, r) for k, r in runs],
                "series": self._series(now),
                "histogram": {"run": self._current, "counts": _trim(current.histogram) if current else []},
                "powder": None if current is None else {
                    "run": self._current, "version": current.powder_version, "peaks": int(current.powder.sum()),
                    "width": cols * wb, "height": rows * hb},
                "hits": [self._hit_row(h, rows, cols) for h in reversed(self._hits)],
                "actors": [vars(a).copy() for a in sorted(self._actors.values(), key=lambda a: a.name)],
                "gpus": [dict(g) for g in self._gpus],
            }
        for a in out["actors"]:
            del a["t"]
        return out

    @staticmethod
    def _run_row(key: str, r: _Run) -> dict:
        return {"key": key, "run": r.label, "frames": r.frames, "hits": r.hits, "peaks": r.peaks,
                "hit_rate": r.hits / r.frames if r.frames else 0.0, "first_t": r.first_t, "last_t": r.last_t,
                "sources": sorted(r.sources)}

    def _hit_row(self, h: _Hit, rows: int, cols: int) -> dict:
        p, hb, wb = self.small_shape
        s = h.summary
        r, c = tile_positions(s["panel"], s["y"], s["x"], p, hb, wb, self.cfg.downsample)
        return {"id": h.id, "source": str(s["source"]), "seq": int(s["seq"]), "run": s["run"],
                "n_peaks": int(s["n_peaks"]), "latency_ms": float(s["latency_ms"]), "t": float(s["t"]),
                "width": cols * wb, "height": rows * hb,
                "rows": np.round(r, 2).tolist(), "cols": np.round(c, 2).tolist()}

    def _series(self, now: float) -> dict:
        """Frames/s and hit rate (%) per run, one point per second over the last history_s;
        the last seconds, which the next polls may still fill, are left out."""
        end = int(now) - (math.ceil(self.interval_s) + 1)
        start = end - int(self.cfg.history_s)
        firsts = [int(r.first_t) for r in self._runs.values() if r.frames]
        if firsts:  # no empty minutes before the first frame: start there (or MIN_SPAN_S back)
            start = max(start, min(min(firsts) - 1, end - MIN_SPAN_S))
        t = list(range(start, end))
        per_run = {}
        for key, run in self._runs.items():
            if not run.seconds or max(run.seconds) < start:
                continue
            first, last = int(run.first_t), int(run.last_t)
            fps, pct = [], []
            for sec in t:
                if first <= sec <= last:
                    n, hits = run.seconds.get(sec, (0, 0))
                    fps.append(n)
                    pct.append(round(100.0 * hits / n, 2) if n else None)
                else:
                    fps.append(None)
                    pct.append(None)
            per_run[key] = {"run": run.label, "fps": fps, "hit_pct": pct}
        return {"t": t, "runs": per_run}

    def hit_png(self, hit_id: int) -> bytes | None:
        """The latest hit `hit_id` as a gray PNG (panels tiled), or None when it is gone."""
        with self._lock:
            hit = next((h for h in self._hits if h.id == hit_id), None)
            if hit is None:
                return None
            if hit.png is not None:
                return hit.png
            image = hit.image
        png = encode_png(to_gray(tile(image, fill=float(np.nanmin(image)) if image.size else 0.0)))
        with self._lock:
            hit.png = png
        return png

    def powder_png(self, run: str | None = None) -> bytes | None:
        """The virtual powder of `run` (default: the current run) as a colour PNG."""
        with self._lock:
            key = self._current if run is None else run
            r = self._runs.get(key) if key is not None else None
            if r is None:
                return None
            powder = r.powder.copy()
        return encode_png(to_heat(tile(powder)))

    def powder(self, run: str | None = None) -> np.ndarray | None:
        """The virtual powder counts of `run` (default: current) in the slab layout (P*h, w)."""
        with self._lock:
            key = self._current if run is None else run
            r = self._runs.get(key) if key is not None else None
            return None if r is None else r.powder.reshape(-1, r.powder.shape[2]).copy()


def _trim(histogram: np.ndarray) -> list[int]:
    nz = np.flatnonzero(histogram)
    return histogram[: nz[-1] + 1].tolist() if nz.size else []
