"""A progress line on a terminal and the stable summary line at the end of a run."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass
class Summary:
    """What one producer sent. `seconds` runs from the first frame to the last delivered one
    (socket flushed), so the rates are what reached the consumer's socket."""

    source: str
    run: int | str
    frames: int
    bytes: int
    seconds: float
    rate_asked: float = 0.0

    @property
    def rate_hz(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def line(self) -> str:
        """key=value pairs, stable for tools to parse."""
        asked = f"{self.rate_asked:g}" if self.rate_asked else "max"
        return (f"summary: source={self.source} run={self.run} frames={self.frames} "
                f"bytes={self.bytes} seconds={self.seconds:.3f} rate_hz={self.rate_hz:.1f} "
                f"gb_per_s={self.gb_per_s:.3f} asked_hz={asked}")


def parse_summary(line: str) -> dict[str, str]:
    """The key=value pairs of a summary line."""
    if not line.startswith("summary:"):
        raise ValueError(f"not a summary line: {line!r}")
    return dict(item.split("=", 1) for item in line.split()[1:])


class Progress:
    """Redraws one line at most `hz` times a second; silent unless enabled."""

    def __init__(self, enabled: bool, total: int | None, stream: TextIO = sys.stderr, hz: float = 5.0):
        self.enabled, self.total, self.stream, self.period = enabled, total, stream, 1.0 / hz
        self._last = 0.0
        self._t0 = time.monotonic()

    def update(self, frames: int, nbytes: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return
        self._last = now
        dt = max(now - self._t0, 1e-9)
        if self.total:
            done = frames / self.total
            bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
            head = f"[{bar}] {frames}/{self.total}"
        else:
            head = f"{frames} frames"
        self.stream.write(f"\r{head} {frames / dt:8.1f} frames/s {nbytes / dt / 1e9:6.3f} GB/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
