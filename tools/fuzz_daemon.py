"""Fuzz a live CPU daemon with malformed and valid messages, and check what it did with each.

    python tools/fuzz_daemon.py --messages 5000 [--seed 0] [--json report.json]

Starts `peaknet-daemon` (embedded Ray, 2 CPU actors, classical finder) with a `peaknet/1` and
an lclstreamer `.npz` ingest socket, and sends, mixed: random bytes, mutated valid headers,
wrong types and ranges, nested and oversized meta, truncated payloads, decompression bombs,
wrong part counts, and valid frames and batches. After a warm-up round it checks that:
- every valid frame gets exactly one result;
- every malformed message is rejected and counted under the reason it was built to have;
- the daemon stays ready (/readyz) and no frame of the run is missing;
- a single part over `max_message_bytes` (ZMQ_MAXMSGSIZE) drops its peer unread, and is counted;
- the RSS of its processes after the round is within 5 % of the RSS after the warm-up.
Prints a JSON report; exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np
import yaml
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_process import free_port, scrape_metrics, wait_ready  # noqa: E402

from peaknet_daemon.wire import encode_control, encode_frame  # noqa: E402

SHAPE = (2, 32, 32)
MAX_BYTES = 1 << 20
SOURCE, RUN = "fuzz", 1

# A case: (socket 'pk' or 'npz', expected rejection reason or None, parts, valid frames it holds)
Case = tuple[str, "str | None", list, int]


class Generator:
    """Malformed and valid messages; valid peaknet frames are numbered seq 0, 1, 2, ..."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.seq = 0
        self.run = RUN
        self.good = np.ones(SHAPE, np.float32)

    def frame(self) -> np.ndarray:
        return self.rng.random(SHAPE, dtype=np.float32) * 50

    def header(self, **changes) -> dict:
        h = msgpack.unpackb(encode_frame(self.good, SOURCE, 0, run=RUN)[0])
        h.update(changes)
        return h

    def mutated(self, payload: bytes | None = None, **changes) -> list:
        return [msgpack.packb(self.header(**changes)), self.good.tobytes() if payload is None else payload]

    def valid(self) -> Case:
        meta = [{}, {"photon_energy_ev": 9500.0, "detector_distance_mm": 120}, {"tag": "x", "n": 3, "ok": True}]
        parts = encode_frame(self.frame(), SOURCE, self.seq, run=self.run, meta=meta[int(self.rng.integers(3))])
        self.seq += 1
        return "pk", None, [bytes(p) for p in parts], 1

    def valid_npz(self) -> Case:
        b = int(self.rng.integers(1, 4))
        return "npz", None, [npz(detector_data=self.rng.random((b, *SHAPE), dtype=np.float32),
                                 timestamp=np.arange(b) + 1.0, photon_wavelength=np.full(b, 1.3))], b

    def nested(self) -> dict:
        m: dict = {"x": 1}
        for _ in range(int(self.rng.integers(1, 200))):
            m = {"m": m}
        return m

    def malformed(self) -> Case:
        r, g = self.rng, self.good
        kinds = [
            ("not_msgpack", lambda: [b"\xc1" + r.bytes(int(r.integers(0, 200)))]),
            ("not_msgpack", lambda: [b"\xc1", g.tobytes()]),
            ("bad_header", lambda: [msgpack.packb([1, 2, 3]), g.tobytes()]),
            ("unknown_proto", lambda: self.mutated(proto=["peaknet/0", None, 1][int(r.integers(3))])),
            ("unknown_type", lambda: self.mutated(type="frames")),
            ("bad_header", lambda: self.mutated(seq=["1", 1.5, None, True][int(r.integers(4))])),
            ("out_of_range", lambda: self.mutated(seq=int(r.integers(2**63, 2**64, dtype=np.uint64)))),
            ("out_of_range", lambda: self.mutated(seq=-int(r.integers(1, 2**62)))),
            ("out_of_range", lambda: self.mutated(timestamp_ns=2**63 + int(r.integers(0, 2**62)))),
            ("bad_header", lambda: self.mutated(run=[1.5, [1], {"a": 1}][int(r.integers(3))])),
            ("bad_header", lambda: self.mutated(source=[5, None, "s" * 300][int(r.integers(3))])),
            ("wrong_shape", lambda: self.mutated(shape=[[2, 32], [2, 32, 31], [-2, 32, 32], "2x32x32"][int(r.integers(4))])),
            ("wrong_dtype", lambda: self.mutated(dtype=["float64", 5, "uint16"][int(r.integers(3))])),
            ("bad_meta", lambda: self.mutated(meta=self.nested())),
            ("bad_meta", lambda: self.mutated(meta={f"k{i}": i for i in range(65 + int(r.integers(100)))})),
            ("bad_meta", lambda: self.mutated(meta={"photon_energy_ev": ["9.5 keV", -1.0, 0, float("nan")][int(r.integers(4))]})),
            ("bad_meta", lambda: self.mutated(meta={"a": [1, [2]]})),
            ("bad_meta", lambda: self.mutated(meta={"s": "x" * 2000})),
            ("size_mismatch", lambda: self.mutated(payload=g.tobytes()[: -int(r.integers(1, 100))])),
            ("size_mismatch", lambda: self.mutated(payload=g.tobytes() + b"\0" * int(r.integers(1, 100)))),
            ("wrong_parts", lambda: self.mutated()[:1]),
            ("wrong_parts", lambda: self.mutated() + [b"extra"]),
            ("wrong_parts", lambda: [bytes(p) for p in encode_control("start", SOURCE, run=99)] + [b"x"]),
            ("oversize", lambda: self.mutated() + [b"\0" * (MAX_BYTES // 2)] * 3),  # each part < limit
            ("oversize", lambda: [msgpack.packb({**self.header(), "pad": "x" * 70_000}), g.tobytes()]),
            ("non_finite", lambda: self.mutated(payload=with_nan(g, r))),
            ("out_of_range", lambda: [msgpack.packb({**msgpack.unpackb(encode_control("end", SOURCE, run=99)[0]),
                                                     "count": 2**64 - 1})]),
        ]
        npz_kinds = [
            ("bad_npz", lambda: [b"PK\x03\x04" + r.bytes(int(r.integers(10, 500)))]),
            ("oversize", lambda: [npz(detector_data=np.zeros((4096, *SHAPE), np.float32))]),  # a bomb
            ("wrong_dtype", lambda: [npz(detector_data=r.random((1, *SHAPE)))]),  # float64
            ("wrong_shape", lambda: [npz(detector_data=np.ones((1, 2, 32, 31), np.float32))]),
            ("non_finite", lambda: [npz(detector_data=np.full((1, *SHAPE), np.inf, np.float32))]),
            ("wrong_parts", lambda: [npz(detector_data=np.ones((1, *SHAPE), np.float32)), b"x"]),
            ("bad_npz", lambda: [npz_claiming_huge_shape()]),
        ]
        if r.random() < 0.2:
            reason, make = npz_kinds[int(r.integers(len(npz_kinds)))]
            return "npz", reason, make(), 0
        reason, make = kinds[int(r.integers(len(kinds)))]
        return "pk", reason, make(), 0

    def cases(self, n: int) -> Iterator[Case]:
        for _ in range(n):
            x = self.rng.random()
            yield self.valid() if x < 0.4 else self.valid_npz() if x < 0.5 else self.malformed()


def with_nan(good: np.ndarray, rng: np.random.Generator) -> bytes:
    bad = good.copy()
    bad.flat[int(rng.integers(bad.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
    return bad.tobytes()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def npz_claiming_huge_shape() -> bytes:
    """A tiny member whose .npy header claims 10^9 frames (a loader that trusts it allocates)."""
    import zipfile
    one = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, *SHAPE), np.float32))
    np.lib.format.write_array_header_1_0(one, {**header, "shape": (10**9, *SHAPE)})
    one.write(np.zeros(SHAPE, np.float32).tobytes())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("detector_data.npy", one.getvalue())
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# The daemon and its endpoints
# ------------------------------------------------------------------------------------------------

def daemon_config(pk: int, npz_port: int, results: int, metrics: int, run_end_grace_s: float = 5,
                  log_level: str = "warning") -> dict:
    sock = {"mode": "connect", "rcvhwm": 64, "max_message_bytes": MAX_BYTES}
    return {
        "model": {"preset": "classical"},
        "pipeline": {"frame_shape": list(SHAPE), "dtype": "float32", "batch_size": 8,
                     "max_batch_delay_ms": 10, "buffers": 2, "device": "cpu"},
        "ray": {"num_cpus": 2},
        "gpus": {"cpu_fallback": True, "cpu_actors": 2},
        "ingest": {"run_end_grace_s": run_end_grace_s, "reject_log_interval_s": 60,
                   "sockets": [{**sock, "endpoint": f"tcp://127.0.0.1:{pk}"},
                               {**sock, "endpoint": f"tcp://127.0.0.1:{npz_port}", "format": "lclstreamer-npz"}]},
        "output": {"results_endpoint": f"tcp://127.0.0.1:{results}", "results_sndhwm": 100_000},
        "metrics": {"port": metrics, "interval_s": 0.5},
        "logging": {"format": "json", "level": log_level},
    }


def rejected(values: dict[str, float]) -> Counter:
    out = Counter()
    for key, v in values.items():
        m = re.match(r'peaknet_frames_rejected_total\{reason="(\w+)"\}', key)
        if m and v:
            out[m.group(1)] = int(v)
    return out


def rss(values: dict[str, float]) -> dict[str, int]:
    return {k[k.index('"') + 1:-2]: int(v) for k, v in values.items() if k.startswith("peaknet_process_rss_bytes{")}


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class Fuzz:
    def __init__(self, seed: int, workdir: Path, run_end_grace_s: float = 5, log_level: str = "warning"):
        self.gen = Generator(seed)
        self.ports = {name: free_port() for name in ("pk", "npz", "results", "metrics")}
        self.ctx = zmq.Context()
        self.push = {}
        for name in ("pk", "npz"):
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 1000)
            s.setsockopt(zmq.SNDTIMEO, 60_000)
            s.bind(f"tcp://127.0.0.1:{self.ports[name]}")
            self.push[name] = s
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(f"tcp://127.0.0.1:{self.ports['results']}")
        self.results: list[dict] = []
        self.expected_rejects: Counter = Counter()
        self.valid_pk = self.valid_npz = 0
        self.run_frames = 0  # valid peaknet frames of the current run
        self.runs_ended = 0
        config = workdir / "fuzz-daemon.yaml"
        config.write_text(yaml.safe_dump(daemon_config(*self.ports.values(), run_end_grace_s, log_level)))
        self.log_path = workdir / "fuzz-daemon.log"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "peaknet_daemon.cli", "--config", str(config)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def send(self, n: int) -> None:
        self.push["pk"].send_multipart(encode_control("start", SOURCE, run=self.gen.run))
        for case in self.gen.cases(n):
            self.send_case(case)
            self.drain()

    def send_case(self, case: Case) -> None:
        sock, reason, parts, frames = case
        self.push[sock].send_multipart(parts)
        if reason is not None:
            self.expected_rejects[reason] += 1
        elif sock == "pk":
            self.valid_pk += frames
            self.run_frames += frames
        else:
            self.valid_npz += frames

    def send_valid(self, n: int) -> None:
        self.push["pk"].send_multipart(encode_control("start", SOURCE, run=self.gen.run))
        for _ in range(n):
            self.send_case(self.gen.valid())
            self.drain()

    def new_run(self, run: int) -> None:
        self.gen.run, self.run_frames = run, 0
        self.push["pk"].send_multipart(encode_control("start", SOURCE, run=run))

    def end_run(self) -> None:
        self.push["pk"].send_multipart(encode_control("end", SOURCE, run=self.gen.run, count=self.run_frames))
        self.runs_ended += 1

    def runs_complete(self, _values: dict | None = None) -> bool:
        """Whether the daemon logged run_complete for every run this source ended (info log)."""
        text = self.log_path.read_text()
        return text.count('"event": "run_complete"') >= self.runs_ended

    def drain(self, timeout_ms: int = 0) -> None:
        while self.pull.poll(timeout_ms):
            self.results.append(msgpack.unpackb(self.pull.recv(), raw=False))
            timeout_ms = 0

    def wait_for(self, what: str, done, timeout: float) -> dict[str, float]:
        """Collect results and scrape until done(values) holds; the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain(200)
            values = scrape_metrics(self.ports["metrics"])
            if done(values):
                return values
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached within {timeout:g} s")

    def settle(self, timeout: float) -> dict[str, float]:
        """Until every result has arrived and the metrics count every rejection."""
        total = self.valid_pk + self.valid_npz
        want = sum(self.expected_rejects.values())
        return self.wait_for("all results and rejections", lambda v: len(self.results) >= total
                             and v.get("peaknet_frames_processed_total", 0) >= total
                             and sum(rejected(v).values()) >= want, timeout)

    def close(self) -> int:
        """Stop the daemon (SIGTERM) and close the sockets; the daemon's exit status. Idempotent."""
        if self.log.closed:
            return self.proc.returncode
        for s in (*self.push.values(), self.pull):
            s.close(linger=0)
        self.ctx.term()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


def run(messages: int, seed: int, warmup: int, workdir: Path, timeout: float) -> dict:
    fuzz = Fuzz(seed, workdir)
    t0 = time.monotonic()
    try:
        wait_ready(fuzz.ports["metrics"], fuzz.proc, timeout=300)
        fuzz.send(warmup)
        warm = fuzz.settle(timeout)
        rss_before = rss(warm)
        t1 = time.monotonic()
        fuzz.send(messages)
        fuzz.push["pk"].send_multipart(encode_control("end", SOURCE, run=RUN, count=fuzz.valid_pk))
        after = fuzz.settle(timeout)
        elapsed = time.monotonic() - t1
        # settled runs are counted by the supervisor's next poll: wait for the end to be seen
        after = fuzz.wait_for("a fresh stats poll", lambda v: v.get("peaknet_frames_processed_total", 0)
                              >= fuzz.valid_pk + fuzz.valid_npz, timeout)
        # last, a single part over max_message_bytes: libzmq drops that peer unread (counted)
        fuzz.push["pk"].send(b"\0" * (2 * MAX_BYTES))
        dropped = fuzz.wait_for("the oversized part's peer dropped",
                                lambda v: v.get("peaknet_ingest_disconnects_total", 0) >= 1, 30)
        is_ready = ready(fuzz.ports["metrics"])
    finally:
        rc = fuzz.close()
    pk_keys = Counter((r["source"], r["seq"]) for r in fuzz.results if r["source"] == SOURCE)
    npz_keys = Counter((r["source"], r["seq"]) for r in fuzz.results if r["source"] != SOURCE)
    rss_after = rss(after)
    total_before, total_after = sum(rss_before.values()), sum(rss_after.values())
    growth = (total_after - total_before) / total_before if total_before else float("nan")
    got_rejects = rejected(after)
    checks = {
        "every valid peaknet frame has exactly one result":
            sorted(pk_keys) == [(SOURCE, i) for i in range(fuzz.valid_pk)] and set(pk_keys.values()) <= {1},
        "every valid npz frame has exactly one result":
            sum(npz_keys.values()) == fuzz.valid_npz and set(npz_keys.values()) <= {1},
        "every malformed message is rejected under its reason": got_rejects == fuzz.expected_rejects,
        "every message taken in is a result or a counted rejection":
            after.get("peaknet_frames_received_total", -1) == fuzz.valid_pk + fuzz.valid_npz + sum(got_rejects.values())
            and after.get("peaknet_frames_processed_total", -1) == fuzz.valid_pk + fuzz.valid_npz,
        "no frame of the run missing": after.get("peaknet_frames_missing_total", -1) == 0,
        "a part over max_message_bytes drops its peer, counted":
            dropped.get("peaknet_ingest_disconnects_total", 0) >= 1 and rejected(dropped) == got_rejects,
        "daemon ready after the round": is_ready,
        "daemon stopped cleanly (exit 0)": rc == 0,
        "RSS within 5 % of the warm-up": abs(growth) <= 0.05,
    }
    return {
        "command": f"python tools/fuzz_daemon.py --messages {messages} --seed {seed} --warmup {warmup}",
        "messages": messages + warmup, "warmup_messages": warmup,
        "valid_frames": {"peaknet": fuzz.valid_pk, "npz": fuzz.valid_npz},
        "results": len(fuzz.results),
        "rejected_by_reason": dict(sorted(got_rejects.items())),
        "expected_by_reason": dict(sorted(fuzz.expected_rejects.items())),
        "missing": int(after.get("peaknet_frames_missing_total", 0)),
        "rss_after_warmup_bytes": rss_before, "rss_after_bytes": rss_after,
        "rss_growth": round(growth, 4), "round_seconds": round(elapsed, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "checks": checks, "ok": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages in the checked round")
    ap.add_argument("--warmup", type=int, default=None, help="messages before RSS is taken (default messages/5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=240, help="s to wait for results and counts")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(200, args.messages // 5)
    with tempfile.TemporaryDirectory(prefix="fuzz-daemon-") as tmp:
        try:
            report = run(args.messages, args.seed, warmup, Path(tmp), args.timeout)
        except Exception as exc:
            log = (Path(tmp) / "fuzz-daemon.log")
            tail = log.read_text()[-3000:] if log.exists() else ""
            print(f"fuzz_daemon: {type(exc).__name__}: {exc}\n--- daemon log tail ---\n{tail}", file=sys.stderr)
            return 1
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
