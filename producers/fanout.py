"""`--sources K`: K producer processes, each its own source id and seed, for load tests.

Each child is this CLI with `--sources 1` and its own `--source`, `--seed`, truth file and (when
binding) endpoint; the parent forwards a stop, echoes the children's output and prints a total
summary line (source=<all>, frames and bytes summed, seconds the longest child's).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

from .errors import ProducerError
from .progress import Summary, parse_summary


def child_args(args: argparse.Namespace, argv: Sequence[str], i: int) -> list[str]:
    """The command line of source i: the parent's, with per-source options appended (argparse
    keeps the last occurrence)."""
    source = f"{args.source}-{i}" if args.source else f"p{i}"
    extra = ["--sources", "1", "--source", source, "--seed", str(args.seed + i), "--no-progress"]
    if args.bind:
        if "{i}" not in args.endpoint:
            raise ProducerError("--sources with --bind needs an endpoint with '{i}' "
                                "(e.g. tcp://*:555{i}), or use --connect")
        extra += ["--endpoint", args.endpoint.replace("{i}", str(i))]
    if getattr(args, "truth", None):
        path = Path(args.truth)
        name = args.truth.replace("{source}", source) if "{source}" in args.truth \
            else str(path.with_name(f"{path.stem}.{source}{path.suffix}"))
        extra += ["--truth", name]
    return list(argv) + extra


def run_sources(args: argparse.Namespace, argv: Sequence[str], stop: threading.Event) -> int:
    cmds = [[sys.executable, "-m", "peaknet_producers.cli", *child_args(args, argv, i)]
            for i in range(args.sources)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in cmds]
    summaries: list[dict[str, str]] = []
    lock = threading.Lock()

    def pump(proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.startswith("summary:"):
                with lock:
                    summaries.append(parse_summary(line.strip()))

    readers = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
    for t in readers:
        t.start()
    forwarded = False
    while any(p.poll() is None for p in procs):
        if stop.wait(0.1) and not forwarded:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            forwarded = True
    for t in readers:
        t.join()
    total = Summary(source="all", run=args.run if args.run is not None else 0,
                    frames=sum(int(s["frames"]) for s in summaries),
                    bytes=sum(int(s["bytes"]) for s in summaries),
                    seconds=max((float(s["seconds"]) for s in summaries), default=0.0),
                    rate_asked=args.rate * args.sources)
    print(total.line(), flush=True)
    return max(p.returncode for p in procs)
