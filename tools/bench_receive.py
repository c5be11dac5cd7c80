"""Bare receiver: what K producers over loopback TCP put into P receiving processes, with none of
the daemon's work (no validation, batching, GPU process, results).

It is the yardstick for the daemon's ingest-only row (`tools/bench_daemon.py --models
ingest-only`): run both in one call on one machine, and the ratio is what the daemon's ingest
costs beyond receiving and one copy. Each receiver process binds its share of the K ports (dealt
as the daemon's bind mode deals sockets), takes every frame off its socket zero-copy and copies
the payload once into its destination, and with --h2d on to the GPU. `--dest` says where the
copy goes:
  reuse  one frame buffer per process, written again for every frame: it stays in the CPU's
         caches (a receiver written for a quick test usually looks like this);
  ring   --ring-frames frames per process, cycled: a working set as large as the daemon's batch
         slots (4 processes x 2 slots x 4 frames by default), far beyond any cache;
  shm    the same ring in POSIX shared memory (with --h2d registered with CUDA), as the
         daemon's slots are (shm_ring.py).

  python tools/bench_receive.py --producers 2 --processes 2 --frames 200      # CPU, quick look
  python tools/bench_receive.py --frame-shape 16,352,384 --producers 8 --processes 4 \
      --dest reuse,ring --h2d                                                 # the README rows
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import frame_bytes, machine_busy_seconds, producers, steady_rate  # noqa: E402
from daemon_process import free_port  # noqa: E402
from peaknet_daemon.wire import DTYPES  # noqa: E402

def receiver(ports: list[int], nbytes: int, dest_kind: str, frames_held: int, h2d: bool, ends_expected: int,
             timeout_s: float, rcvbuf: int, ready: "mp.Queue", results: "mp.Queue") -> None:
    """One receiving process: bind, copy each payload into the next destination frame, count
    arrivals until every producer of its ports said `end` (or nothing came for timeout_s)."""
    ctx = zmq.Context()
    socks = []
    for port in ports:
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.RCVHWM, 8)  # as bench_daemon's ingest sockets
        s.setsockopt(zmq.LINGER, 0)
        if rcvbuf:
            s.setsockopt(zmq.RCVBUF, rcvbuf)  # the kernel's TCP receive buffer (SO_RCVBUF)
        s.bind(f"tcp://127.0.0.1:{port}")
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    shm = host = None
    if dest_kind == "shm":  # as the daemon's batch slots: POSIX shared memory, registered with CUDA
        shm = shared_memory.SharedMemory(create=True, size=frames_held * nbytes)
        dest = np.ndarray((frames_held, nbytes), np.uint8, buffer=shm.buf)
    if h2d:
        import torch
        if shm is not None:
            err = torch.cuda.cudart().cudaHostRegister(dest.ctypes.data, dest.nbytes, 0)
            if getattr(err, "value", err) != 0:
                raise RuntimeError(f"cudaHostRegister of the shared ring failed: {err}")
            host = torch.from_numpy(dest)
        else:
            host = torch.empty((frames_held, nbytes), dtype=torch.uint8, pin_memory=True)
            dest = host.numpy()
        device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()
        copied: list = [None] * frames_held  # the event of each host frame's last H2D copy
    elif shm is None:
        dest = np.empty((frames_held, nbytes), np.uint8)
    dest[:] = 1  # touch every page before timing
    ready.put(True)
    arrivals: list[float] = []
    ends = wrong = 0
    while ends < ends_expected:
        if not poller.poll(timeout_s * 1000):
            break
        for s in socks:
            while True:
                try:
                    parts = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(parts) == 1:
                    ends += msgpack.unpackb(parts[0].bytes).get("type") == "end"
                    continue
                payload = np.frombuffer(parts[-1].buffer, np.uint8)
                if payload.size != nbytes:
                    wrong += 1
                    continue
                i = len(arrivals) % frames_held
                if h2d:
                    if copied[i] is not None:
                        copied[i].synchronize()  # the frame's last copy to the GPU has left it
                    np.copyto(dest[i], payload)
                    with torch.cuda.stream(stream):
                        device.copy_(host[i], non_blocking=True)
                        copied[i] = torch.cuda.Event()
                        copied[i].record(stream)
                else:
                    np.copyto(dest[i], payload)
                arrivals.append(time.monotonic())
    if h2d:
        stream.synchronize()
        if shm is not None:
            torch.cuda.cudart().cudaHostUnregister(dest.ctypes.data)
    if shm is not None:
        del dest, host
        shm.unlink()
    results.put({"arrivals": arrivals, "ends": ends, "wrong_size": wrong})


def run_row(k: int, procs: int, dest: str, args) -> dict:
    """K producers into P receivers; GB/s over the middle 80 % of all arrivals."""
    nbytes = frame_bytes(args)
    ports = [free_port() for _ in range(k)]
    p = max(1, min(procs, k))
    shares = [ports[i::p] for i in range(p)]
    held = 1 if dest == "reuse" else args.ring_frames
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    workers = [ctx.Process(target=receiver, args=(share, nbytes, dest, held, args.h2d, len(share),
                                                 args.timeout, args.rcvbuf, ready, results), daemon=True)
               for share in shares]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=120)
    producer_args = argparse.Namespace(data="random", format="peaknet/1", compression="none",
                                       frame_shape=args.frame_shape, dtype=args.dtype, ingest_mode="bind",
                                       producer_io_threads=args.producer_io_threads)
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    senders = producers(ports, producer_args, args.frames, 0)
    got = [results.get(timeout=args.timeout + 600) for _ in workers]
    busy1, t1 = machine_busy_seconds(), time.monotonic()
    for s in senders:
        s.wait()
    for w in workers:
        w.join(10)
    arrivals = sorted(a for g in got for a in g["arrivals"])
    fps = steady_rate(arrivals)
    return {"producers": k, "processes": p, "dest": dest, "h2d": args.h2d, "frames_held": held,
            "frame_bytes": nbytes, "received": len(arrivals), "sent": k * args.frames,
            "wrong_size": sum(g["wrong_size"] for g in got), "fps": fps, "gb_s": fps * nbytes / 1e9,
            "machine_cores": (busy1 - busy0) / (t1 - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--producers", default="2", help="K values, comma-separated")
    p.add_argument("--processes", type=int, default=4, help="receiving processes (at most K)")
    p.add_argument("--dest", default="reuse,ring", help="reuse, ring and/or shm (see above)")
    p.add_argument("--ring-frames", type=int, default=8, help="frames per process with --dest ring or shm")
    p.add_argument("--frames", type=int, default=200, help="frames per producer")
    p.add_argument("--frame-shape", default="4,256,256")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--h2d", action="store_true", help="also copy every frame to the GPU (pinned host memory)")
    p.add_argument("--producer-io-threads", type=int, default=1)
    p.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF of the receiving sockets, bytes (0 = the OS's)")
    p.add_argument("--timeout", type=float, default=30.0, help="s without a message that ends a receiver")
    p.add_argument("--json", default="", help="also write the rows here")
    args = p.parse_args()
    rows = []
    for dest in args.dest.split(","):
        if dest not in ("reuse", "ring", "shm"):
            p.error(f"--dest: reuse, ring or shm, got {dest!r}")
        for k in (int(v) for v in args.producers.split(",")):
            row = run_row(k, args.processes, dest, args)
            rows.append(row)
            lost = row["sent"] - row["received"]
            print(f"dest={dest:5s} K={k} P={row['processes']} h2d={int(args.h2d)}  {row['fps']:8.1f} frames/s "
                  f"{row['gb_s']:6.2f} GB/s  machine cores busy {row['machine_cores']:.1f}"
                  f"{f'  NOT RECEIVED {lost}' if lost else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
