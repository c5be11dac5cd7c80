"""Soak a live CPU daemon: a fixed load for N minutes, then memory growth and losses.

    python tools/soak.py --minutes 20 [--load 0.8] [--malformed 0.05] [--json report.json]

Starts the same daemon as `tools/fuzz_daemon.py` (2 CPU actors, classical finder, a `peaknet/1`
and an `.npz` socket), measures its maximum rate with a burst of valid frames, then sends
`--load` of that rate (default 80 %), paced, with a share of malformed messages, for N minutes,
in runs of `--run-seconds` (each with `start` and `end`). The same load runs first for
`--warmup-minutes` (default 3): allocator arenas, Ray's workers and the CXI writers reach their
working size there, so the growth measured after it is what a long beamtime would see. Reports
the RSS of every daemon process at the start and the end of the soak, the total RSS once a
minute (a leak grows steadily, a warm-up levels off), results, rejections by reason and missing
frames.
Exit status 0 when no frame is missing, every valid frame has one result, every malformed
message is counted, and the total RSS grew by less than `--max-growth` (default 1 %).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_process import wait_ready  # noqa: E402
from fuzz_daemon import RUN, Fuzz, rejected, rss, scrape  # noqa: E402


def measure_max_rate(fuzz: Fuzz, frames: int, timeout: float) -> float:
    """Frames/s of a burst of valid frames, send to last result."""
    t0 = time.monotonic()
    fuzz.send_valid(frames)
    fuzz.settle(timeout)
    return frames / (time.monotonic() - t0)


def soak(fuzz: Fuzz, rate: float, seconds: float, run_seconds: float, malformed: float, first_run: int = 1,
         samples: list | None = None, sample_every: float = 60.0) -> int:
    """Paced load; returns the number of runs sent. With `samples`, appends (minutes, total RSS)
    at the start and every `sample_every` seconds."""
    period = 1.0 / rate
    start = next_t = time.monotonic()
    next_sample = start
    runs = 0
    while time.monotonic() - start < seconds:
        runs += 1
        fuzz.new_run(RUN + first_run + runs - 1)
        run_end = min(start + seconds, time.monotonic() + run_seconds)
        while time.monotonic() < run_end:
            if fuzz.gen.rng.random() < malformed:
                fuzz.send_case(fuzz.gen.malformed())
            else:
                fuzz.send_case(fuzz.gen.valid())
            next_t += period
            fuzz.drain()
            if samples is not None and time.monotonic() >= next_sample:
                total = sum(rss(scrape(fuzz.ports["metrics"])).values())
                samples.append((round((time.monotonic() - start) / 60, 2), total))
                next_sample += sample_every
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load
        fuzz.end_run()
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--warmup-minutes", type=float, default=3.0, help="same load before the start reading")
    ap.add_argument("--load", type=float, default=0.8, help="share of the measured maximum rate")
    ap.add_argument("--malformed", type=float, default=0.05, help="share of malformed messages")
    ap.add_argument("--run-seconds", type=float, default=60.0, help="length of each run")
    ap.add_argument("--burst", type=int, default=3000, help="valid frames to measure the maximum rate")
    ap.add_argument("--max-growth", type=float, default=0.01, help="allowed RSS growth (fraction)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        fuzz = Fuzz(args.seed, Path(tmp), run_end_grace_s=5, log_level="info")
        try:
            wait_ready(fuzz.ports["metrics"], fuzz.proc, timeout=300)
            max_rate = measure_max_rate(fuzz, args.burst, 300)
            fuzz.end_run()
            warm_runs = soak(fuzz, args.load * max_rate, args.warmup_minutes * 60, args.run_seconds, args.malformed)
            before = fuzz.settle(300)
            t0 = time.monotonic()
            samples: list[tuple[float, int]] = []
            runs = soak(fuzz, args.load * max_rate, args.minutes * 60, args.run_seconds, args.malformed,
                        first_run=warm_runs + 1, samples=samples)
            sent_seconds = time.monotonic() - t0
            after = fuzz.settle(300)
            after = fuzz.wait_for("every run settled", lambda v: v.get("peaknet_frames_processed_total", 0)
                                  >= fuzz.valid_pk and fuzz.runs_complete(v), 120)
        except Exception as exc:
            tail = fuzz.log_path.read_text()[-3000:] if fuzz.log_path.exists() else ""
            print(f"soak: {type(exc).__name__}: {exc}\n--- daemon log tail ---\n{tail}", file=sys.stderr)
            fuzz.close()
            return 1
        finally:
            rc = fuzz.close()
    keys = Counter((r["source"], r["run"], r["seq"]) for r in fuzz.results)
    rss_start, rss_end = rss(before), rss(after)
    growth = sum(rss_end.values()) / sum(rss_start.values()) - 1
    got = rejected(after)
    report = {
        "command": "python tools/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "max_rate_fps": round(max_rate, 1), "load_fps": round(args.load * max_rate, 1),
        "minutes": round(sent_seconds / 60, 2), "runs": runs,
        "valid_frames": fuzz.valid_pk, "results": len(fuzz.results),
        "duplicates": sum(n - 1 for n in keys.values()),
        "rejected_by_reason": dict(sorted(got.items())), "expected_by_reason": dict(sorted(fuzz.expected_rejects.items())),
        "missing": int(after.get("peaknet_frames_missing_total", -1)),
        "warmup_minutes": args.warmup_minutes,
        "rss_start_bytes": rss_start, "rss_end_bytes": rss_end, "rss_growth": round(growth, 4),
        "rss_total_by_minute": samples,
        "daemon_exit": rc,
    }
    report["ok"] = (report["missing"] == 0 and report["duplicates"] == 0 and len(keys) == fuzz.valid_pk
                    and got == fuzz.expected_rejects and growth < args.max_growth and rc == 0)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
