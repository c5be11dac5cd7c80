"""The daemon's frame arithmetic, in one place: totals over every actor incarnation, restarts,
frames lost with a dead actor, and settled runs.

Actors report cumulative stats; an actor that restarts comes back with fresh counters under a
new incarnation id. `Accounting` keeps the latest stats of every incarnation, so a dead one's
frames still count. When an incarnation ends, its last word is its tally file (rewritten by
the worker after every batch) merged with what its results sender sent (`merge_sent`), or else
its last polled stats; what it had taken off its sockets and not finished (`in_flight`) is
counted as lost in the restart. Metrics only display `totals()`.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Optional

import msgpack

from .runs import RunOutcome, RunTracker

_SCALARS = ("received", "processed", "peaks", "hits", "control_messages", "peaks_truncated", "auth_failures",
            "peer_disconnects", "ingest_slot_wait_ms")
_LABELLED = ("rejected", "sink_errors", "thread_failures", "results_dropped")


RUNS_KEPT = 256  # per-run tallies an actor keeps (most recently updated); older runs are long settled


def count_in_run(runs: OrderedDict, source: str, run: Any, seq: int) -> None:
    """One more result of (source, run) in an actor's `runs` tally: [count, min seq, max seq]
    per run, the layout of the stats' `runs` rows."""
    key = (source, run)
    tally = runs.get(key)
    if tally is None:
        runs[key] = [1, seq, seq]
        while len(runs) > RUNS_KEPT:
            runs.popitem(last=False)
        return
    runs.move_to_end(key)
    tally[0] += 1
    tally[1], tally[2] = min(tally[1], seq), max(tally[2], seq)


def run_rows(runs: OrderedDict) -> list[list]:
    """An actor's `runs` tally as the stats' rows: [source, run, count, min seq, max seq]."""
    return [[source, run, *tally] for (source, run), tally in runs.items()]


def write_tally_file(path: str | os.PathLike, data: dict) -> None:
    """Write a tally (msgpack) by an atomic rename, so a reader sees the old one or the new one."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgpack.packb(data, use_bin_type=True))
    os.replace(tmp, path)


def read_tally_file(path: str | os.PathLike) -> Optional[dict]:
    """A tally written by `write_tally_file`; None when there is none or it cannot be read."""
    try:
        return msgpack.unpackb(Path(path).read_bytes(), raw=False)
    except (OSError, ValueError, msgpack.UnpackException):
        return None


def merge_sent(worker: Optional[dict], sent: Optional[dict]) -> Optional[dict]:
    """A dead incarnation's tally with its results sender's final count
    (sinks/results_sender.py). The sender counted every result the worker's pipe delivered,
    also those written after the worker's last tally, so its `processed`, per-run counts,
    peaks and hits stand; the frames in flight shrink by what it sent beyond the worker's count."""
    if sent is None or not sent.get("final"):
        return worker
    base = dict(worker or {})
    extra = int(sent["processed"]) - int(base.get("processed", 0))
    dropped = Counter({str(k): int(v) for k, v in (base.get("results_dropped") or {}).items()})
    dropped.update({str(k): int(v) for k, v in (sent.get("results_dropped") or {}).items()})
    base.update(processed=int(sent["processed"]), peaks=int(sent["peaks"]), hits=int(sent["hits"]),
                runs=sent["runs"], results_dropped=dict(dropped),
                in_flight=max(0, int(base.get("in_flight", 0)) - extra))
    return base


class Accounting:
    """See the module docstring."""

    def __init__(self, grace_s: float):
        self.runs = RunTracker(grace_s)
        self._latest: dict[tuple[int, str], dict] = {}  # (actor index, incarnation) -> stats
        self._current: dict[int, str] = {}  # actor index -> its live incarnation
        self._ended: set[tuple[int, str]] = set()
        self.restarts: Counter[int] = Counter()
        self.lost_in_restart = 0
        self.missing = 0
        self._settled: list[RunOutcome] = []  # settled by `end`, returned by the next `observe`

    def observe(self, stats: list[dict], now: float) -> list[RunOutcome]:
        """Take one poll's stats; returns the runs settled by it. A new incarnation of an actor
        ends the previous one (with what was last seen of it, unless `end` was called first)."""
        for s in stats:
            key = (s["index"], s["incarnation"])
            old = self._current.get(s["index"])
            if old is not None and old != s["incarnation"]:
                self.end(s["index"], old, None, now)
            self._current[s["index"]] = s["incarnation"]
            self._latest[key] = s
        outcomes = self._settled + self.runs.update(stats, now)
        self._settled = []
        self.missing += sum(o.missing for o in outcomes)
        return outcomes

    def end(self, index: int, incarnation: str, final: Optional[dict], now: float) -> int:
        """An incarnation died; `final` is its tally file when there is one. Returns the frames
        it lost (taken off its sockets, neither finished nor rejected)."""
        key = (index, incarnation)
        if key in self._ended:
            return 0
        self._ended.add(key)
        last = self._latest.get(key, {})
        if final is not None and final.get("processed", -1) >= last.get("processed", 0):
            last = {**last, **final}
            self._latest[key] = last
            self._settled += self.runs.update([last], now)
        lost = max(0, int(last.get("in_flight", 0)))
        self.lost_in_restart += lost
        self.restarts[index] += 1
        if self._current.get(index) == incarnation:
            del self._current[index]
        return lost

    def settle_all(self) -> list[RunOutcome]:
        """At shutdown: settle every open run."""
        outcomes = self.runs.settle_all()
        self.missing += sum(o.missing for o in outcomes)
        return outcomes

    def current(self, index: int) -> Optional[str]:
        return self._current.get(index)

    def totals(self) -> dict[str, Any]:
        """Cumulative totals over all actors and incarnations."""
        out: dict[str, Any] = {k: 0 for k in _SCALARS}
        labelled: dict[str, Counter] = {k: Counter() for k in _LABELLED}
        in_flight = 0
        for key, s in self._latest.items():
            for k in _SCALARS:
                out[k] += int(s.get(k, 0))
            for k in _LABELLED:
                labelled[k].update({str(r): int(n) for r, n in (s.get(k) or {}).items()})
            if key not in self._ended:
                in_flight += int(s.get("in_flight", 0))
        out.update({k: dict(v) for k, v in labelled.items()})
        out.update(missing=self.missing, lost_in_restart=self.lost_in_restart,
                   restarts=sum(self.restarts.values()), in_flight=in_flight)
        return out
