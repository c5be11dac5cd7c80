"""Test harness: the daemon as a subprocess, its JSON log, its metrics, a results consumer.

Waiting is always on a condition (a log event, a metric value, a result count) with a deadline,
never a bare sleep.
"""

from __future__ import annotations

import contextlib

import json
import os
import shutil
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import yaml
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from daemon_process import free_port  # noqa: E402  (one choice of ports for tests and tools)

SMALL_SHAPE = [2, 64, 64]


def events_in(line: str) -> list[dict]:
    """The JSON log events in one line of the daemon's stderr. With JSON logs every line is one
    event (daemon/log.py's WorkerLogWriter prints the actors' lines); a console-format run keeps
    Ray's "(PipelineActor pid=...)" prefix, and Ray prints a line and its newline in two writes,
    so a supervisor line can share an actor's line there."""
    decoder, events, i = json.JSONDecoder(), [], line.find("{")
    while i >= 0:
        try:
            event, end = decoder.raw_decode(line, i)
        except ValueError:
            i = line.find("{", i + 1)
            continue
        if isinstance(event, dict):
            events.append(event)
        i = line.find("{", end)
    return events


def free_port_pair() -> int:
    """A port P with P and P + 1 both free (bind mode: actor i binds base + i)."""
    while True:
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
                return base
            except OSError:
                continue


def small_config(tmp: Path, in_port: int, results_port: int, metrics_port: int, **sections) -> dict:
    """2 CPU actors, classical finder on small uint16 frames, connect mode to a binding producer."""
    cfg = {
        "model": {"preset": "classical", "classical": {"snr_threshold": 6.0, "min_pixels": 2}},
        "pipeline": {"frame_shape": SMALL_SHAPE, "dtype": "uint16", "batch_size": 4,
                     "max_batch_delay_ms": 20, "buffers": 2, "device": "cpu"},
        "ray": {"num_cpus": 2},
        "gpus": {"cpu_fallback": True, "cpu_actors": 2},
        "ingest": {"run_end_grace_s": 5, "reject_log_interval_s": 60,
                   "sockets": [{"endpoint": f"tcp://127.0.0.1:{in_port}", "mode": "connect",
                                "max_message_bytes": 1 << 20}]},
        "output": {"results_endpoint": f"tcp://127.0.0.1:{results_port}", "results_bind": False,
                   "cxi_dir": str(tmp / "cxi"), "frames_per_file": 100, "save_frames": "all",
                   "hit_threshold": 1},
        "metrics": {"port": metrics_port, "interval_s": 0.5},
        "logging": {"format": "json", "level": "info"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


class Daemon:
    """`peaknet-daemon --config` in a subprocess with its JSON log parsed as it arrives."""

    def __init__(self, cfg: dict, tmp: Path, env: dict | None = None):
        self.cfg = cfg
        self.path = tmp / "daemon.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.events: list[dict] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.metrics_port = cfg["metrics"]["port"]
        full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "peaknet_daemon.cli", "--config", str(self.path)],
                                     env=full_env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self.events.extend(events_in(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(self, name: str, timeout: float = 120, where=lambda e: True) -> dict:
        def found():
            return next((e for e in self.events if e.get("event") == name and where(e)), None)
        with self._cond:
            ok = self._cond.wait_for(lambda: found() is not None or self.proc.poll() is not None, timeout)
            event = found()
        assert event is not None, f"no '{name}' event within {timeout}s (ok={ok}); log tail:\n{self.tail()}"
        return event

    def find(self, name: str) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "".join(self.lines[-n:])

    def wait_ready(self, timeout: float = 180) -> None:
        self.wait_event("daemon_ready", timeout)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+\d.eEinfNa]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_metric(self, name: str, predicate, timeout: float = 30) -> dict[str, float]:
        """Scrape until `predicate(value of name)` holds; returns that scrape."""
        return self.wait_metrics(lambda values: predicate(values.get(name, 0.0)), timeout, name)

    def wait_metrics(self, predicate, timeout: float = 30, what: str = "metrics") -> dict[str, float]:
        """Scrape until `predicate(all values)` holds; returns that scrape."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if predicate(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} never satisfied the check: {values}")
            time.sleep(0.2)  # polling another process's HTTP endpoint: no event to wait on

    def terminate(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Results:
    """A PULL socket bound where the daemon's actors push results; collects in a thread."""

    def __init__(self, port: int):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.items: list[dict] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                item = msgpack.unpackb(self.sock.recv(), raw=False)
                with self._cond:
                    self.items.append(item)
                    self._cond.notify_all()

    def wait_count(self, n: int, timeout: float = 120, where=lambda r: True) -> list[dict]:
        with self._cond:
            self._cond.wait_for(lambda: sum(1 for r in self.items if where(r)) >= n, timeout)
            return [r for r in self.items if where(r)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)
        self.ctx.term()


def producer(*args: str) -> subprocess.Popen:
    """`peaknet-producer ARGS` as a subprocess."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "peaknet_producers.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics_from(*polls: list[dict], metrics=None):
    """What the supervisor does with successive polls of actor stats: the accounting folds
    them, the metrics display its totals. Returns the Metrics."""
    from peaknet_daemon.accounting import Accounting
    from peaknet_daemon.metrics import Metrics
    m = metrics if metrics is not None else Metrics()
    acc = Accounting(grace_s=10)
    for i, poll in enumerate(polls):
        poll = [{"index": 0, "incarnation": "i0", "runs": [], "controls": [], **s} for s in poll]
        acc.observe(poll, float(i))
        m.update(acc.totals(), poll)
    return m


RAY = str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def ray_cluster(nodes: int = 1, cpus_per_node: int = 1):
    """A Ray cluster on this machine (`ray start --head`, then more nodes); yields its address.
    Each `ray start` runs in a session of its own, and the node's processes stay in it, so the
    cluster is stopped by killing those sessions: `ray stop` would stop every Ray on the machine.
    Daemons that join by `ray.address` start in a second or two instead of starting Ray."""
    if not Path(RAY).exists():
        raise AssertionError("the ray CLI is missing from this environment")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    temp = Path("/tmp") / f"ray-pn-{port}"  # unix socket paths must stay short
    common = [f"--num-cpus={cpus_per_node}", "--num-gpus=0", "--disable-usage-stats"]
    sessions: list[int] = []
    try:
        for i in range(nodes):
            where = ([ "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"] if i == 0
                     else [f"--address=127.0.0.1:{port}"])
            proc = subprocess.Popen([RAY, "start", *where, *common], env=env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            sessions.append(proc.pid)  # the session's id: its processes outlive `ray start`
            if proc.wait(timeout=180) != 0:  # returns once the node is up
                raise AssertionError(f"ray start {' '.join(where)} exited with {proc.returncode}")
        yield f"127.0.0.1:{port}"
    finally:
        for sid in reversed(sessions):
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
