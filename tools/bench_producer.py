#!/usr/bin/env python3
"""Throughput of one `random` producer into one PULL socket, over ipc and tcp, as the producer's
own summary line reports it (first frame to last frame delivered, i.e. socket flushed).

The receiver is a separate process that binds a PULL socket and drops each message (zero-copy
receive, optional copy into a preallocated buffer with --copy, as the daemon's ingest does).

    .venv/bin/python tools/bench_producer.py [--frames 400] [--shape 16,352,384] [--dtype float32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from peaknet_producers.progress import parse_summary

RECEIVER = r"""
import sys, numpy as np, zmq
from peaknet_daemon.wire import decode_header
ep, copy = sys.argv[1], sys.argv[2] == "1"
ctx = zmq.Context(); s = ctx.socket(zmq.PULL); s.bind(ep)
print("ready", flush=True)
slot = None
while True:
    parts = s.recv_multipart(copy=False)
    if len(parts) == 1 and decode_header(parts[0].buffer).type == "end":
        break
    if len(parts) == 2 and copy:
        buf = parts[1].buffer
        if slot is None or slot.nbytes != len(buf):
            slot = np.empty(len(buf), np.uint8)
        slot[:] = np.frombuffer(buf, np.uint8)
s.close(); ctx.term()
"""


def bench(endpoint: str, frames: int, shape: str, dtype: str, hwm: int, copy: bool) -> dict:
    rx = subprocess.Popen([sys.executable, "-c", RECEIVER, endpoint, "1" if copy else "0"],
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    cmd = [sys.executable, "-m", "peaknet_producers.cli", "random", "--endpoint", endpoint, "--connect",
           "--frames", str(frames), "--shape", shape, "--dtype", dtype, "--hwm", str(hwm), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    rx.wait(timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"producer failed: {out.stderr.strip()}")
    return parse_summary([l for l in out.stdout.splitlines() if l.startswith("summary:")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description="peaknet-producer throughput over ipc and tcp")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--shape", default="16,352,384")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hwm", type=int, default=32)
    ap.add_argument("--port", type=int, default=5757)
    ap.add_argument("--copy", action="store_true", help="receiver copies each payload into a buffer")
    ap.add_argument("--repeat", type=int, default=1, help="runs per transport; the best is shown")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        endpoints = {"ipc": f"ipc://{Path(tmp) / 'bench.ipc'}", "tcp": f"tcp://127.0.0.1:{args.port}"}
        print(f"one random producer -> one PULL socket; frame {args.shape} {args.dtype}, "
              f"{args.frames} frames, hwm {args.hwm}, receiver {'copies' if args.copy else 'drops'}")
        print(f"{'transport':<10}{'frames':>8}{'seconds':>10}{'frames/s':>12}{'GB/s':>8}")
        for name, ep in endpoints.items():
            runs = [bench(ep, args.frames, args.shape, args.dtype, args.hwm, args.copy) for _ in range(args.repeat)]
            s = max(runs, key=lambda r: float(r["gb_per_s"]))
            print(f"{name:<10}{s['frames']:>8}{float(s['seconds']):>10.3f}{float(s['rate_hz']):>12.1f}"
                  f"{float(s['gb_per_s']):>8.2f}")


if __name__ == "__main__":
    main()
