"""End-to-end benchmark: K producers -> ZMQ -> peaknet-daemon -> results stream.

For each model and K it starts the real daemon (`peaknet-daemon --config`, embedded Ray, one
actor per GPU or one CPU actor) with K ingest sockets (so min(K, 4) ingest processes), runs K
`peaknet-producer random` processes as fast as they go, and measures at the results consumer:
- end-to-end frames/s and GB/s (results received over the steady window),
- latency p50/p99 (receive -> result, as each result reports it) at 80% of that rate (--load),
- host cores the daemon's process tree used in the steady window (CPU seconds / wall seconds),
  and the cores the whole machine was busy (producers, daemon, kernel: /proc/stat),
- the mean peaks per frame of the results: extraction's work, which for a net with random
  weights depends on its draw (fixed since model/finder.py's RANDOM_WEIGHTS_SEED),
- the ingest processes' time without a free batch slot, in seconds per second summed over them
  (from /metrics, refreshed every second, so only for a window of >= 5 s; nan below): near their
  count, the GPU side (or too few slots in flight: --buffers) is the limit; near 0, ingest or the
  producers,
and, for the ratio (end-to-end / model), the same model and batch on a device-resident batch:
the bare net's forward rate for PeakNet (what the pipeline overlaps extraction with), the
finder + extraction rate for the classical finder.
The `ingest-only` model finds nothing at no cost: its row is what ingest alone moves.

  python tools/bench_daemon.py                          # CPU: tiny frames, a quick look
  python tools/bench_daemon.py --frame-shape 16,352,384 --precision bf16 --compile \
      --models ingest-only,peaknet-atto,peaknet-small --producers 1,2,4,8   # the GPU table in the README
  python tools/bench_daemon.py --format stream2 --compression bslz4 ...      # as an EIGER2 sends

With `--format stream2` the producers send DECTRIS Stream V2 (CBOR, `--compression` bslz4, lz4
or none) and the daemon decodes and decompresses it; a row then gives GB/s twice: decompressed
(the frames the pipeline got) and on the wire (the bytes the producers sent, from their summary
lines). `--data bragg` sends simulated Bragg frames (a pool of 8 per producer), whose
compression ratio is a detector's, instead of random integers in [0, 1000).

With --monitor the live page is on (monitor.enabled) and a thread does what an open browser
does: fetch /monitor/state.json, the latest hits' PNGs and the powder every refresh_s.
`--hit-threshold 0` makes every frame a hit, so the monitor's hit sampling is always busy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import msgpack
import numpy as np
import yaml
import zmq

from daemon_process import free_port, scrape_metrics, wait_ready


def model_section(model: str, checkpoint: str) -> dict:
    """'auto': the shipped weights (and their threshold) for peaknet-atto, random weights for
    peaknet-small (none are shipped) at threshold 0.75, where a random net marks no pixel (at
    0.5 it marks ~37% of them); extraction cost depends on what the net marks."""
    if model == "ingest-only":
        return {"preset": model}
    if checkpoint == "auto":
        return {"preset": model, "checkpoint": "default" if model == "peaknet-atto" else "", "threshold": 0.75}
    return {"preset": model, "checkpoint": "" if model == "classical" else checkpoint}


def daemon_config(model: str, args, ports: list[int], results: str, metrics_port: int) -> dict:
    """The daemon's config: one bound TCP ingest socket (and thread) per producer. TCP, not ipc:
    with ipc, libzmq (pyzmq 27.3) was seen to drop a producer's last messages when the producer
    exits while the receiver sits at its HWM."""
    shape = [int(v) for v in args.frame_shape.split(",")]
    return {
        "model": model_section(model, args.checkpoint),
        "pipeline": {"frame_shape": shape, "dtype": args.dtype, "batch_size": args.batch,
                     "max_batch_delay_ms": args.max_delay_ms, "buffers": args.buffers, "precision": args.precision,
                     "channels_last": args.compile, "compile": args.compile,
                     "compile_mode": args.compile_mode, "device": "auto"},
        "ray": {"num_cpus": max(2, min(len(ports), 4) + 1), "max_restarts": 0},  # a crash ends the bench
        "gpus": {"cpu_fallback": not args.gpu, "cpu_actors": 1, "max_actors": args.gpus},
        "ingest": {"sockets": [{**s, "format": args.format} for s in ingest_sockets(ports, args)],
                   "processes": args.ingest_processes,
                   **({} if args.streaming_copy_bytes is None else {"streaming_copy_bytes": args.streaming_copy_bytes})},
        "output": {"results_endpoint": results, "results_mode": "push", "results_bind": False,
                   "hit_threshold": args.hit_threshold, "cxi_dir": ""},
        "metrics": {"port": metrics_port, "interval_s": 1.0},
        "monitor": {"enabled": args.monitor},
        "logging": {"format": "json", "level": args.log_level},
    }


class PageReader:
    """What an open /monitor page fetches, every second, in a thread (--monitor)."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}/monitor/"
        self.polls = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=5) as r:
            return r.read()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                state = json.loads(self._get("state.json"))
                for hit in state["hits"]:
                    self._get(f"hit/{hit['id']}.png")
                if state["powder"]:
                    self._get(f"powder.png?run={state['powder']['run']}")
                self.polls += 1
            except OSError:
                self.errors += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def ingest_sockets(ports: list[int], args) -> list[dict]:
    """bind: one bound socket per producer (so K producers feed min(K, 4) ingest processes).
    connect: producers bind, and every ingest process connects to each (PUSH spreads a
    producer's frames over them), as a daemon does with a detector that binds."""
    if args.ingest_mode == "bind":
        return [{"endpoint": f"tcp://127.0.0.1:{port}", "mode": "bind", "rcvhwm": 8} for port in ports]
    threads = args.ingest_processes or 4  # each ingest process connects to every producer
    return [{"endpoint": f"tcp://127.0.0.1:{port}", "mode": "connect", "rcvhwm": 8, "threads": threads}
            for port in ports]


def producers(ports: list[int], args, frames: int, rate: float, capture: bool = False) -> list[subprocess.Popen]:
    """K producer processes; with `capture` their stdout (the summary line) can be read."""
    procs = []
    data = ["bragg", "--pool", "8"] if args.data == "bragg" else ["random"]
    wire = ["--format", args.format] + (["--compression", args.compression] if args.format == "stream2" else [])
    for i, port in enumerate(ports):
        cmd = [sys.executable, "-m", "peaknet_producers.cli", *data, "--endpoint", f"tcp://127.0.0.1:{port}",
               "--bind" if args.ingest_mode == "connect" else "--connect", "--shape", args.frame_shape, "--dtype", args.dtype, "--frames", str(frames),
               "--rate", str(rate), "--source", f"p{i}", "--run", "1", "--seed", str(i),
               "--io-threads", str(args.producer_io_threads), *wire]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=capture))
    return procs


def wire_bytes_per_frame(procs: list[subprocess.Popen]) -> float:
    """Mean bytes per frame the producers sent (message parts), from their summary lines."""
    frames = nbytes = 0
    for p in procs:
        for line in (p.stdout.read() if p.stdout else "").splitlines():
            if line.startswith("summary:"):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                frames += int(fields["frames"])
                nbytes += int(fields["bytes"])
    return nbytes / frames if frames else float("nan")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of `root` and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(times.get(pid, 0.0) for pid in tree)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; Linux /proc/stat), so a row can say
    how much of the machine the producers and the daemon took together."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def consume(pull: zmq.Socket, n: int, timeout_s: float,
            peaks: Optional[list[int]] = None) -> tuple[list[float], list[float]]:
    """Receive n results; returns arrival times and reported latencies (ms); each result's peak
    count goes to `peaks` when given (what extraction had to do)."""
    arrivals, latencies = [], []
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    deadline = time.monotonic() + timeout_s
    while len(arrivals) < n and time.monotonic() < deadline:
        if poller.poll(1000):
            r = msgpack.unpackb(pull.recv(), raw=False)
            arrivals.append(time.perf_counter())
            latencies.append(r["latency_ms"])
            if peaks is not None:
                peaks.append(r["n_peaks"])
    return arrivals, latencies


def metric_total(port: int, name: str) -> float:
    """One counter of the daemon's /metrics (0 when absent or unreadable). The supervisor
    refreshes it every metrics.interval_s (1 s here), so a difference over a window is close."""
    try:
        return scrape_metrics(port).get(name, 0.0)
    except OSError:
        return 0.0


SLOT_WAIT = "peaknet_ingest_slot_wait_milliseconds_total"
SLOT_WAIT_MIN_S = 5.0  # the shortest steady window the slot-wait figure is given for


def steady_rate(arrivals: list[float]) -> float:
    """Frames/s over the middle 80% of arrivals (start-up and tail excluded)."""
    if len(arrivals) < 10:
        return float("nan")
    a, b = int(len(arrivals) * 0.1), int(len(arrivals) * 0.9)
    return (b - a) / (arrivals[b] - arrivals[a])


def run_model(model: str, ks: list[int], args, on_row=lambda row: None) -> list[dict]:
    """One daemon per model with max(ks) ingest sockets; for each K, producers on the first K."""
    tmp = Path(tempfile.mkdtemp(prefix="pnbench-"))
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 100000)
    results = f"ipc://{tmp}/results.sock"
    pull.bind(results)
    mport = free_port()
    cfg_path = tmp / "daemon.yaml"
    ports = [free_port() for _ in range(max(ks))]
    cfg_path.write_text(yaml.safe_dump(daemon_config(model, args, ports, results, mport)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log_path = Path(args.log_dir or tmp) / f"daemon-{model}.log"
    print(f"{model}: daemon log {log_path}", flush=True)
    daemon = subprocess.Popen([sys.executable, "-m", "peaknet_daemon.cli", "--config", str(cfg_path)], env=env,
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    rows = []
    page = None
    try:
        wait_ready(mport, daemon, timeout=args.timeout)
        page = PageReader(mport) if args.monitor else None
        for k in ks:
            # warm-up (compile, allocator), then the max-rate run, then --load (80 %) of it for latency
            for p in producers(ports[:k], args, args.warmup, 0):
                p.wait()
            consume(pull, args.warmup * k, args.timeout)
            per = args.frames // k
            procs = producers(ports[:k], args, per, 0, capture=True)
            cpu0, busy0, t0 = tree_cpu_seconds(daemon.pid), machine_busy_seconds(), time.perf_counter()
            wait0 = metric_total(mport, SLOT_WAIT)
            peaks: list[int] = []
            arrivals, lat = consume(pull, per * k, args.timeout, peaks)
            cpu1, busy1, t1 = tree_cpu_seconds(daemon.pid), machine_busy_seconds(), time.perf_counter()
            wait1 = metric_total(mport, SLOT_WAIT)
            for p in procs:
                p.wait()
            row = {"model": model, "producers": k, "fps": steady_rate(arrivals), "received": len(arrivals),
                   "host_cores": (cpu1 - cpu0) / (t1 - t0), "machine_cores": (busy1 - busy0) / (t1 - t0),
                   "machine_cpus": os.cpu_count(), "format": args.format,
                   "compression": args.compression if args.format == "stream2" else "none", "data": args.data}
            row["gb_s"] = row["fps"] * frame_bytes(args) / 1e9  # decompressed: what the pipeline got
            row["wire_bytes_per_frame"] = wire_bytes_per_frame(procs)
            row["wire_gb_s"] = row["fps"] * row["wire_bytes_per_frame"] / 1e9
            row["monitor"] = args.monitor
            row["peaks_per_frame"] = float(np.mean(peaks)) if peaks else float("nan")
            # seconds per second that ingest processes (summed) had no free slot; the metric is
            # refreshed every second, so a shorter window than SLOT_WAIT_MIN_S says nothing
            row["slot_wait_s_per_s"] = ((wait1 - wait0) / 1e3 / (t1 - t0) if t1 - t0 >= SLOT_WAIT_MIN_S
                                        else float("nan"))
            rate_at_load = args.load * row["fps"] / k
            n_at_load = max(int(rate_at_load * args.latency_seconds), 20)
            procs = producers(ports[:k], args, n_at_load, rate_at_load)
            _, lat_at_load = consume(pull, n_at_load * k, args.timeout)
            for p in procs:
                p.wait()
            row["p50_ms"], row["p99_ms"] = (float(np.percentile(lat_at_load, q)) for q in (50, 99))
            row["load"] = args.load
            row["p50_ms_max_rate"], row["p99_ms_max_rate"] = (float(np.percentile(lat, q)) for q in (50, 99))
            rows.append(row)
            on_row(row)
    except Exception:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise
    finally:
        if page is not None:
            page.stop()
            print(f"{model}: monitor page polled {page.polls} times, {page.errors} errors", flush=True)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        pull.close(linger=0)
        ctx.term()
    return rows


def frame_bytes(args) -> int:
    return int(np.prod([int(v) for v in args.frame_shape.split(",")])) * np.dtype(args.dtype).itemsize


def model_only(model: str, args) -> float:
    """Frames/s of the model alone on a device-resident batch (the same model and batch)."""
    import torch

    from peaknet_daemon.config import config_from_dict
    from peaknet_daemon.pipeline_throughput import model_only_rate
    cfg = config_from_dict({k: v for k, v in daemon_config(model, args, [0], "", 0).items()
                            if k in ("model", "pipeline", "gpus")}, "<bench>")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # as many torch threads as a CPU actor has (more thrash on a busy machine)
        torch.set_num_threads(cfg.gpus.cpu_threads)
    return model_only_rate(cfg, seconds=args.seconds, device=device, bare_net=cfg.model.kind == "peaknet")


def main(argv: list[str] | None = None) -> int:
    import torch
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="ingest-only,peaknet-atto,peaknet-small" if gpu else "ingest-only,classical,peaknet-atto")
    p.add_argument("--producers", default="1,2,4,8" if gpu else "1,2")
    p.add_argument("--frame-shape", default="16,352,384" if gpu else "2,64,64")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--format", default="peaknet/1", choices=("peaknet/1", "stream2"), help="wire format")
    p.add_argument("--compression", default="bslz4", choices=("bslz4", "lz4", "none"), help="stream2 only")
    p.add_argument("--data", default="random", choices=("random", "bragg"),
                   help="random integers/normals, or simulated Bragg frames (a detector's compression ratio)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--streaming-copy-bytes", type=int, default=None,
                   help="ingest.streaming_copy_bytes (default: the daemon's; 0 = copies through the caches, "
                        "as before it existed)")
    p.add_argument("--buffers", type=int, default=3,
                   help="pipeline.buffers: batch slots beyond the 2 each ingest process holds")
    p.add_argument("--max-delay-ms", type=float, default=20)
    p.add_argument("--load", type=float, default=0.8, help="the latency run's rate, as a fraction of the max rate")
    p.add_argument("--precision", default="bf16" if gpu else "fp32")
    p.add_argument("--compile", action="store_true", default=False)
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, with --compile")
    p.add_argument("--checkpoint", default="auto", help="auto | '' (random weights) | a file")
    p.add_argument("--frames", type=int, default=3000 if gpu else 300)
    p.add_argument("--warmup", type=int, default=64 if gpu else 16)
    p.add_argument("--latency-seconds", type=float, default=4.0)
    p.add_argument("--seconds", type=float, default=5.0, help="model-only measurement time")
    p.add_argument("--ingest-mode", choices=("connect", "bind"), default="connect",
                   help="connect: the daemon connects to producers that bind (one producer feeds several ingest "
                        "processes); bind: one bound socket per producer")
    p.add_argument("--ingest-processes", type=int, default=0, help="ingest.processes (0 = one per socket, at most 4)")
    p.add_argument("--producer-io-threads", type=int, default=1,
                   help="ZMQ I/O threads of each producer (connect mode: spreads its ingest connections)")
    p.add_argument("--gpus", type=int, default=1, help="actors (GPUs) to use; 0 = all healthy")
    p.add_argument("--monitor", action="store_true", help="live page on, read every second as a browser would")
    p.add_argument("--hit-threshold", type=int, default=10, help="output.hit_threshold (0: every frame is a hit)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--log-level", default="warning", help="the daemon's log level")
    p.add_argument("--log-dir", help="write the daemon logs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=300, help="give up waiting for readiness or results after this")
    args = p.parse_args(argv)
    args.gpu = gpu
    # A SIGTERM (e.g. from `timeout`) unwinds through run_model's finally: the daemon is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"bench_daemon: terminated; rows so far in {args.json}"))
    rows: list[dict] = []
    for model in args.models.split(","):
        mo = model_only(model, args)

        def on_row(row: dict, mo: float = mo) -> None:
            row["model_only_fps"] = mo
            row["ratio"] = row["fps"] / mo
            rows.append(row)
            wire = (f"{row['format']} {row['compression']}: wire {row['wire_gb_s']:.2f} GB/s, "
                    f"{frame_bytes(args) / row['wire_bytes_per_frame']:.2f}x  ")
            print(f"{row['model']:14s} K={row['producers']}{' monitor' if args.monitor else ''}  end-to-end {row['fps']:8.1f} frames/s "
                  f"({row['gb_s']:.2f} GB/s decompressed)  {wire}model-only {mo:8.1f}  ratio {row['ratio']:.2f}  "
                  f"p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms at {args.load:.0%}  "
                  f"(p99 {row['p99_ms_max_rate']:.1f} ms at max)  host cores {row['host_cores']:.1f} "
                  f"(machine {row['machine_cores']:.1f} of {row['machine_cpus']})  "
                  f"ingest slot wait {row['slot_wait_s_per_s']:.2f} s/s", flush=True)
            if args.json:  # after every row, so a timeout keeps what was measured
                Path(args.json).write_text(json.dumps(rows, indent=1))

        run_model(model, [int(v) for v in args.producers.split(",")], args, on_row)
    print("\n| model | dtype | format | data | K | end-to-end frames/s | GB/s | wire GB/s | model-only frames/s "
          f"| ratio | peaks/frame | p50 ms @{args.load:.0%} | p99 ms @{args.load:.0%} | host cores | machine cores "
          "| slot wait s/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = r["format"] + (f" {r['compression']}" if r["format"] == "stream2" else "")
        print(f"| {r['model']} | {args.dtype} | {fmt} | {r['data']} | {r['producers']} | {r['fps']:.1f} | {r['gb_s']:.2f} "
              f"| {r['wire_gb_s']:.2f} "
              f"| {r['model_only_fps']:.1f} | {r['ratio']:.2f} | {r['peaks_per_frame']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['host_cores']:.1f} | {r['machine_cores']:.1f} | {r['slot_wait_s_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
