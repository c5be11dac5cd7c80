"""`make demo`: the daemon on the CPU demo config, fed the bundled sample run, and what it found.

Starts `peaknet-daemon --config configs/demo-cpu.yaml` (embedded Ray, one CPU actor, the shipped
PeakNet-atto), replays producers/data/sample_run.h5 (20 simulated epix10k2M frames) with
`peaknet-producer replay`, reads the results stream, compares each frame's peaks with the run's
ground truth and prints a table; the CXI files land in out/demo/.

`python tools/demo.py --monitor-screenshot docs/monitor.png` also turns the live page on and
saves headless Chromium's picture of it once the run is in (the README's screenshot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import yaml
import zmq

from browser import find_chromium, screenshot
from daemon_process import free_port, wait_ready

from peaknet_daemon.evaluation import PeakList, match_frame
from peaknet_producers.sample import FRAMES, SAMPLE_RUN, SAMPLE_TRUTH
from peaknet_producers.truth import read_truth

ROOT = Path(__file__).resolve().parent.parent


def scrape(port: int, until_processed: int, timeout: float = 10) -> list[str]:
    """The daemon's frame and peak counters, once they include every result we received
    (actor stats reach the supervisor every metrics.interval_s)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            lines = [ln for ln in r.read().decode().splitlines()
                     if ln.startswith(("peaknet_frames_processed_total", "peaknet_peaks_found_total"))]
        done = any(ln.startswith("peaknet_frames_processed_total") and float(ln.split()[-1]) >= until_processed
                   for ln in lines)
        if done or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)  # polling another process's HTTP endpoint


def monitor_screenshot(port: int, frames: int, out: Path, timeout: float = 30) -> None:
    """Once the live page has every frame: headless Chromium's picture of it."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found for --monitor-screenshot (apt-get install chromium)")
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/monitor/state.json", timeout=5) as r:
            if json.loads(r.read())["totals"]["frames"] >= frames or time.monotonic() > deadline:
                break
        time.sleep(0.5)  # polling another process's HTTP endpoint
    print(f"demo: monitor screenshot {screenshot(chromium, f'http://127.0.0.1:{port}/monitor/', out)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--monitor-screenshot", type=Path, help="turn the live page on and save its picture here")
    args = p.parse_args(argv)
    cfg = yaml.safe_load((ROOT / "configs" / "demo-cpu.yaml").read_text())
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    cfg["ingest"]["sockets"][0]["endpoint"] = f"tcp://127.0.0.1:{in_port}"
    cfg["output"]["results_endpoint"] = f"tcp://127.0.0.1:{res_port}"
    out_dir = ROOT / "out" / "demo"
    shutil.rmtree(out_dir, ignore_errors=True)  # the demo's own output folder: start clean
    cfg["output"]["cxi_dir"] = str(out_dir)
    cfg["metrics"]["port"] = met_port
    cfg["logging"]["level"] = "warning"
    if args.monitor_screenshot:
        cfg["monitor"] = {"enabled": True}
    tmp = Path(tempfile.mkdtemp(prefix="peaknet-demo-"))
    cfg_path = tmp / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{res_port}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    print(f"demo: starting peaknet-daemon (config {cfg_path}, log {tmp / 'daemon.log'})", flush=True)
    t0 = time.monotonic()
    daemon = subprocess.Popen([sys.executable, "-m", "peaknet_daemon.cli", "--config", str(cfg_path)],
                              env=env, stderr=open(tmp / "daemon.log", "w"))
    try:
        wait_ready(met_port, daemon)
        print(f"demo: daemon ready after {time.monotonic() - t0:.1f} s; replaying {SAMPLE_RUN.name}", flush=True)
        producer = subprocess.run([sys.executable, "-m", "peaknet_producers.cli", "replay", str(SAMPLE_RUN),
                                   "--endpoint", f"tcp://127.0.0.1:{in_port}", "--connect", "--no-progress"],
                                  env=env, capture_output=True, text=True, timeout=300)
        if producer.returncode != 0:
            raise SystemExit(f"demo: producer failed: {producer.stderr.strip()}")
        results = []
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        while len(results) < FRAMES and poller.poll(120_000):
            results.append(msgpack.unpackb(pull.recv(), raw=False))
        metrics = scrape(met_port, until_processed=len(results))
        if args.monitor_screenshot:
            monitor_screenshot(met_port, len(results), args.monitor_screenshot)
    finally:
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=120)
        pull.close(linger=0)
        ctx.term()

    truth = read_truth(SAMPLE_TRUTH)
    print(f"\n{'seq':>4} {'found':>6} {'true':>5} {'matched':>8} {'hit':>4} {'latency ms':>11}")
    found_total = true_total = matched_total = 0
    for r in sorted(results, key=lambda r: r["seq"]):
        t = truth.get(r["seq"], {})
        true_peaks = PeakList.from_columns(t) if t else PeakList(*(np.zeros(0),) * 3)
        m = match_frame(PeakList.from_columns(r["peaks"]), true_peaks)
        matched = int(m.true_found.sum())
        found_total += r["n_peaks"]
        true_total += len(true_peaks)
        matched_total += matched
        print(f"{r['seq']:>4} {r['n_peaks']:>6} {len(true_peaks):>5} {matched:>8} {'yes' if r['hit'] else 'no':>4} "
              f"{r['latency_ms']:>11.1f}")
    precision = matched_total / found_total if found_total else float("nan")
    recall = matched_total / true_total if true_total else float("nan")
    files = sorted(out_dir.glob("*.cxi"))
    print(f"\nframes processed: {len(results)} of {FRAMES}; peaks found: {found_total} "
          f"(true {true_total}; precision {precision:.3f}, recall {recall:.3f} within 1.5 px); "
          f"hits: {sum(r['hit'] for r in results)}")
    print("metrics: " + "; ".join(metrics))
    print(f"CXI files: {', '.join(str(f.relative_to(ROOT)) for f in files[-3:]) or 'none'}; daemon exit {rc}")
    return 0 if len(results) == FRAMES and rc == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:
        sys.exit(f"demo: {exc}")
