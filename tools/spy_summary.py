#!/usr/bin/env python3
"""Where each thread of each process spends its time, from a py-spy raw (collapsed) profile.

Record with thread names and idle samples, so that a thread's waits show as well as its work
(a launcher that waits for its queue is starved; one that waits in a device sync is not):

    py-spy record --subprocesses --threads --idle --rate 50 --format raw -o run.raw -- \\
        python tools/bench_daemon.py ...
    python tools/spy_summary.py run.raw --top 6 --min-share 0.02

For every (process, thread name) with enough samples: its sample count, and the stacks' last
`--depth` frames that take the largest shares of that thread's samples.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<cmd>.*)"$')
_THREAD = re.compile(r"^thread \((?P<tid>\w+)\)(?:: (?P<name>.*))?$")


def _short(cmd: str, width: int = 70) -> str:
    words = [w.rsplit("/", 1)[-1] if i < 2 else w for i, w in enumerate(cmd.split())]
    text = " ".join(words)
    return text if len(text) <= width else text[: width - 3] + "..."


def _frame(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py:12)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def summarise(lines: list[str], depth: int = 2) -> dict[tuple[str, str], Counter]:
    """{(process, thread name): Counter(tail of stack -> samples)}."""
    out: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for raw in lines:
        m = _LINE.match(raw.rstrip("\n"))
        if not m:
            continue
        frames = m["stack"].split(";")
        process, thread = "?", "?"
        while frames and (p := _PROCESS.match(frames[0])):  # --subprocesses: parent, ..., the process
            process = f"{p['pid']} {_short(p['cmd'])}"
            frames = frames[1:]
        if frames and (t := _THREAD.match(frames[0])):
            thread = t["name"] or t["tid"]
            frames = frames[1:]
        tail = " <- ".join(_frame(f) for f in reversed(frames[-depth:])) if frames else "(no Python frame)"
        out[(process, thread)][tail] += int(m["count"])
    return out


def format_summary(summary: dict[tuple[str, str], Counter], top: int = 6, min_share: float = 0.02) -> str:
    total = sum(sum(c.values()) for c in summary.values()) or 1
    rows = []
    for (process, thread), counts in sorted(summary.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(counts.values())
        if n / total < min_share:
            continue
        rows.append(f"{process} | {thread}: {n} samples")
        rows += [f"    {c / n:6.1%}  {tail}" for tail, c in counts.most_common(top)]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="py-spy --format raw output")
    ap.add_argument("--depth", type=int, default=2, help="innermost frames shown per stack")
    ap.add_argument("--top", type=int, default=6, help="stacks shown per thread")
    ap.add_argument("--min-share", type=float, default=0.02, help="hide threads with a smaller share of samples")
    args = ap.parse_args(argv)
    lines = Path(args.raw).read_text().splitlines()
    print(format_summary(summarise(lines, args.depth), args.top, args.min_share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
