"""Deadline-based rate control: frame i is due at t0 + i / rate.

Sleeping 1/rate after each send accumulates the send time and the sleep overshoot into the
period; fixed deadlines do not, so the long-run rate is exact and only single frames jitter.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class Pacer:
    """Waits for each frame's deadline. rate 0 means as fast as possible. When the sender falls
    more than `max_lag_s` behind (a slow link), the schedule restarts from now instead of
    bursting to catch up."""

    def __init__(self, rate_hz: float, stop: threading.Event | None = None, max_lag_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if rate_hz < 0:
            raise ValueError("rate must be >= 0")
        self.rate, self.stop, self.max_lag, self.clock = float(rate_hz), stop, max_lag_s, clock
        self._t0: float | None = None
        self._offset = 0  # frame index the schedule was (re)anchored at
        self.resets = 0

    def wait(self, i: int) -> bool:
        """Block until frame i is due; False when `stop` was set meanwhile."""
        if self.stop is not None and self.stop.is_set():
            return False
        if self.rate == 0:
            return True
        now = self.clock()
        if self._t0 is None:
            self._t0, self._offset = now, i
            return True
        due = self._t0 + (i - self._offset) / self.rate
        if now - due > self.max_lag:
            self._t0, self._offset = now, i
            self.resets += 1
            return True
        return self._sleep_until(due)

    def _sleep_until(self, due: float) -> bool:
        while True:
            remaining = due - self.clock()
            if remaining <= 0:
                return True
            if self.stop is None:
                time.sleep(remaining)
            elif self.stop.wait(min(remaining, 0.1)):
                return False
