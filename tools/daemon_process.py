"""Shared by the tools that drive a real daemon (demo, bench_daemon): a free port and waiting
for the daemon's /readyz."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


PORTS = (20000, 32768)  # above Ray's worker ports (10002-19999), below Linux's ephemeral range


def ephemeral_start() -> int:
    """Where the kernel's ephemeral ports (outgoing connections, bind to port 0) begin."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return PORTS[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, and that nothing takes by itself before
    the caller binds it: it lies outside the kernel's ephemeral range, where the daemon's Ray
    processes open their many connections (one of them once held a test's port), and outside
    Ray's worker ports."""
    top = min(PORTS[1], ephemeral_start())
    for _ in range(1000):
        port = random.randrange(PORTS[0], top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {PORTS[0]}-{top - 1}")


def scrape_metrics(port: int) -> dict[str, float]:
    """The daemon's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+\d.eEinfNa]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until the daemon's /readyz answers 200; RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling another process's HTTP endpoint: no event to wait on
    raise RuntimeError(f"the daemon was not ready within {timeout:g} s")
