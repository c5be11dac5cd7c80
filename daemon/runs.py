"""Run accounting across actors.

ZMQ hands each message to one actor only, `start`/`end` included, so no single actor knows when
a run is over. The supervisor feeds every actor's cumulative stats here. A run (source, run)
is settled:
- when the actors together processed the `count` its `end` announced, or `grace_s` after that
  `end` (the shortfall is missing);
- without an `end`: `grace_s` after the same source's next run appeared, or at shutdown; then
  the missing frames are the gaps in the seq range the actors processed.
Missing frames are frames that produced no result: lost before ingest, lost in an actor restart,
or rejected. Stats are kept per actor incarnation, so frames processed by an actor that later
died still count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Key = tuple[str, Any]


@dataclass(frozen=True)
class RunOutcome:
    source: str
    run: Any
    count: int  # frames the source sent: from `end`, else the processed seq range
    processed: int
    missing: int
    timed_out: bool  # settled by a grace time rather than by the count being reached
    how: str = "end"  # end | next_run | shutdown


@dataclass
class _Tally:
    processed: int = 0
    lo: int | None = None
    hi: int | None = None

    @property
    def span(self) -> int:
        return 0 if self.lo is None else self.hi - self.lo + 1


class RunTracker:
    """See the module docstring."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._latest: dict[tuple[int, str], dict] = {}  # (actor index, incarnation) -> stats
        self._ends: dict[Key, tuple[int, float]] = {}  # -> (count, first seen)
        self._first_seen: dict[Key, float] = {}
        self._done: set[Key] = set()

    def update(self, stats: list[dict], now: float) -> list[RunOutcome]:
        """Take the latest stats of each actor; return runs settled since the last call."""
        for s in stats:
            self._latest[(s["index"], s["incarnation"])] = s
            for c in s["controls"]:
                key = (c["source"], c["run"])
                if c["type"] == "end" and key not in self._ends and key not in self._done:
                    self._ends[key] = (int(c["count"]), now)
        tallies = self.tallies()
        for key in tallies:
            self._first_seen.setdefault(key, now)
        finished = []
        for key, (count, seen) in list(self._ends.items()):
            n = tallies.get(key, _Tally()).processed
            timed_out = n < count and now - seen >= self.grace_s
            if n >= count or timed_out:
                finished.append(RunOutcome(key[0], key[1], count, n, max(count - n, 0), timed_out))
                del self._ends[key]
                self._done.add(key)
        newest: dict[str, float] = {}
        for (source, _), t in self._first_seen.items():
            newest[source] = max(newest.get(source, t), t)
        for key, tally in tallies.items():
            open_run = key not in self._done and key not in self._ends
            superseded = newest[key[0]] > self._first_seen[key] and now - newest[key[0]] >= self.grace_s
            if open_run and superseded:
                finished.append(self._settle_by_seq(key, tally, "next_run"))
        return finished

    def settle_all(self) -> list[RunOutcome]:
        """At shutdown: settle every open run from what was processed."""
        tallies = self.tallies()
        out = []
        for key in list(self._ends) + [k for k in tallies if k not in self._ends]:
            if key in self._done:
                continue
            if key in self._ends:
                count, _ = self._ends.pop(key)
                n = tallies.get(key, _Tally()).processed
                out.append(RunOutcome(key[0], key[1], count, n, max(count - n, 0), n < count, "shutdown"))
                self._done.add(key)
            else:
                out.append(self._settle_by_seq(key, tallies[key], "shutdown"))
        return out

    def _settle_by_seq(self, key: Key, tally: _Tally, how: str) -> RunOutcome:
        self._done.add(key)
        return RunOutcome(key[0], key[1], tally.span, tally.processed, max(tally.span - tally.processed, 0),
                          True, how)

    def tallies(self) -> dict[Key, _Tally]:
        """Processed frames and seq range per (source, run), over all actors and incarnations."""
        out: dict[Key, _Tally] = {}
        for s in self._latest.values():
            for source, run, n, lo, hi in s["runs"]:
                t = out.setdefault((source, run), _Tally())
                t.processed += n
                t.lo = lo if t.lo is None else min(t.lo, lo)
                t.hi = hi if t.hi is None else max(t.hi, hi)
        return out

    def processed(self) -> dict[Key, int]:
        """Frames processed per (source, run), over all actors and incarnations."""
        return {k: t.processed for k, t in self.tallies().items()}

    def pending(self) -> list[Key]:
        """Runs whose `end` arrived but which are not complete yet."""
        return list(self._ends)
