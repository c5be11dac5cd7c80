"""The actor side of the monitor: a bounded, rate-limited side channel of results and hit frames.

The worker's result thread hands every frame's result to `HitSampler.offer`; it keeps a slim
summary (no intensities, no metadata) and, for at most `max_hits_per_s` hits a second, the hit's
frame. `drain()` (called from the actor's stats()) takes what was gathered since the last call and
shrinks the frames to small images, so the expensive part runs off the result thread and only a
few kilobytes per hit travel to the supervisor. Memory is bounded: at most `max_results_per_poll`
summaries (the oldest are dropped and counted) and `latest_hits` frames.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from ..config import MonitorConfig

SUMMARY_KEYS = ("source", "seq", "run", "n_peaks", "hit", "latency_ms")


def summarize(result: dict, t: float) -> dict[str, Any]:
    """What the monitor needs of one `peaknet-result/1` record: no intensities, no metadata."""
    out = {k: result[k] for k in SUMMARY_KEYS}
    peaks = result["peaks"]
    out["panel"], out["y"], out["x"], out["t"] = peaks["panel"], peaks["y"], peaks["x"], t
    return out


def block_max(frame: np.ndarray, factor: int) -> np.ndarray:
    """(P, H, W) -> (P, ceil(H/f), ceil(W/f)) float32, each pixel the largest of its f x f block:
    a peak of a few pixels stays visible where a block mean would wash it out."""
    frame = np.asarray(frame, dtype=np.float32)
    if factor == 1:
        return frame.copy()
    p, h, w = frame.shape
    hb, wb = -(-h // factor), -(-w // factor)
    if (hb * factor, wb * factor) != (h, w):
        padded = np.full((p, hb * factor, wb * factor), np.nan, np.float32)
        padded[:, :h, :w] = frame
        frame = padded
    return np.nanmax(frame.reshape(p, hb, factor, wb, factor), axis=(2, 4))


class HitSampler:
    """See the module docstring. Thread-safe: offer() on the result thread, drain() elsewhere."""

    def __init__(self, cfg: MonitorConfig, hit_threshold: int, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.cfg, self.hit_threshold = cfg, int(hit_threshold)
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._results: deque[dict] = deque(maxlen=cfg.max_results_per_poll)
        self._frames: deque[tuple[dict, np.ndarray]] = deque(maxlen=cfg.latest_hits)
        self._dropped = 0
        self._rate = float(cfg.max_hits_per_s)
        self._capacity = max(1.0, self._rate)  # a burst of at most one second's worth
        self._tokens = self._capacity if self._rate > 0 else 0.0
        self._t = clock()
        self._granted = 0  # frames wants_frame() let be copied that offer() has not seen yet

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._t) * self._rate)
        self._t = now

    def _take_token(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wants_frame(self, n_peaks: int) -> bool:
        """Before the frame is copied out of its slot: is this a hit the page may get now?
        A True takes one of the rate limit's tokens, so a batch full of hits copies few."""
        if n_peaks < self.hit_threshold:
            return False
        with self._lock:
            if self._take_token():
                self._granted = min(self._granted + 1, int(self._capacity))
                return True
            return False

    def offer(self, result: dict, frame: np.ndarray | None = None) -> None:
        """Every frame's result; `frame` is its data when it was copied out (for the CXI writer
        or because wants_frame said yes). A hit frame is kept within the rate limit."""
        summary = summarize(result, self._wall())
        with self._lock:
            if len(self._results) == self._results.maxlen:
                self._dropped += 1
            self._results.append(summary)
            if frame is None or not result["hit"]:
                return
            if self._granted > 0:
                self._granted -= 1
            elif not self._take_token():
                return
            self._frames.append((summary, frame))

    def drain(self) -> dict[str, Any]:
        """What was gathered since the last call: {'results': [summary], 'hits': [(summary,
        image)], 'dropped': n} with images shrunk by `downsample` (block max, float32)."""
        with self._lock:
            results, frames, dropped = list(self._results), list(self._frames), self._dropped
            self._results.clear()
            self._frames.clear()
            self._dropped = 0
        hits = [(s, block_max(f, self.cfg.downsample)) for s, f in frames]
        return {"results": results, "hits": hits, "dropped": dropped}
