"""Run accounting across actors.

ZMQ hands each message to one actor only, `start`/`end` included, so no single actor knows when
a run is over. The supervisor feeds every actor's cumulative stats here; a run (source, run) is
complete when the actors together processed `count` frames of it, or `grace_s` after its `end`,
in which case the shortfall is reported as missing. Stats are kept per actor incarnation, so
frames processed by an actor that later died still count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunOutcome:
    source: str
    run: Any
    count: int  # frames the source says it sent
    processed: int
    missing: int
    timed_out: bool


class RunTracker:
    """See the module docstring."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._latest: dict[tuple[int, str], dict] = {}  # (actor index, incarnation) -> stats
        self._ends: dict[tuple[str, Any], tuple[int, float]] = {}  # -> (count, first seen)
        self._done: set[tuple[str, Any]] = set()

    def update(self, stats: list[dict], now: float) -> list[RunOutcome]:
        """Take the latest stats of each actor; return runs that completed since the last call."""
        for s in stats:
            self._latest[(s["index"], s["incarnation"])] = s
            for c in s["controls"]:
                key = (c["source"], c["run"])
                if c["type"] == "end" and key not in self._ends and key not in self._done:
                    self._ends[key] = (int(c["count"]), now)
        processed = self.processed()
        finished = []
        for key, (count, seen) in list(self._ends.items()):
            n = processed.get(key, 0)
            timed_out = n < count and now - seen >= self.grace_s
            if n >= count or timed_out:
                finished.append(RunOutcome(key[0], key[1], count, n, max(count - n, 0), timed_out))
                del self._ends[key]
                self._done.add(key)
        return finished

    def processed(self) -> dict[tuple[str, Any], int]:
        """Frames processed per (source, run), over all actors and incarnations."""
        totals: dict[tuple[str, Any], int] = {}
        for s in self._latest.values():
            for source, run, n in s["runs"]:
                totals[(source, run)] = totals.get((source, run), 0) + n
        return totals

    def pending(self) -> list[tuple[str, Any]]:
        """Runs whose `end` arrived but which are not complete yet."""
        return list(self._ends)
