"""CURVE: an authorised producer's frames are processed, unauthorised peers are refused and
counted; key generation; the warning for open non-loopback binds. All on TCP loopback."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from harness import metrics_from, free_port
from peaknet_daemon.config import ConfigError, config_from_dict
from peaknet_daemon.metrics import Metrics
from peaknet_daemon.security import curve_client, exposure_warnings, keygen_main, load_key_pair
from peaknet_daemon.worker import Worker
from peaknet_producers.errors import ProducerError
from peaknet_producers.item import Item
from peaknet_producers.sender import run_producer

SHAPE = (2, 32, 32)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """daemon, producer, consumer and intruder key pairs; only producer and consumer authorised."""
    root = tmp_path_factory.mktemp("keys")
    for name in ("daemon", "producer", "consumer", "intruder"):
        assert keygen_main([str(root / "private"), name]) == 0
    allowed = root / "authorized"
    allowed.mkdir()
    for name in ("producer", "consumer"):
        (allowed / f"{name}.key").write_bytes((root / "private" / f"{name}.key").read_bytes())
    return root


def test_keygen_writes_a_private_secret_and_refuses_to_overwrite(keys, capsys):
    secret = keys / "private" / "daemon.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    public, secret_key = load_key_pair(secret)
    assert len(public) == len(secret_key) == 40  # Z85 of 32 bytes
    assert keygen_main([str(keys / "private"), "daemon"]) == 1
    with pytest.raises(ValueError, match="no secret key"):
        load_key_pair(keys / "private" / "daemon.key")


def test_curve_needs_both_keys_in_the_config(keys):
    with pytest.raises(ConfigError, match="curve_authorized_dir"):
        config_from_dict({"security": {"curve_server_secret": str(keys / "private" / "daemon.key_secret")}})


def test_open_binds_on_the_network_warn_unless_curve():
    def cfg(endpoint, **security):
        return config_from_dict({"ingest": {"sockets": [{"endpoint": endpoint, "mode": "bind"}]},
                                 "output": {"results_endpoint": "tcp://*:7000", "results_bind": True},
                                 "security": security})
    warnings = exposure_warnings(cfg("tcp://0.0.0.0:6000"))
    assert len(warnings) == 2 and "tcp://0.0.0.0:6000" in warnings[0] and "tcp://*:7000" in warnings[1]
    assert len(exposure_warnings(cfg("tcp://127.0.0.1:6000"))) == 1  # the results bind only
    assert exposure_warnings(cfg("tcp://0.0.0.0:6000", curve_server_secret="d.key_secret",
                                 curve_authorized_dir="keys")) == []


class CurveConsumer:
    """A results consumer that binds a PULL socket and speaks CURVE as a client."""

    def __init__(self, port: int, keys: Path, name: str = "consumer"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        curve_client(self.sock, keys / "private" / f"{name}.key_secret", keys / "private" / "daemon.key")
        self.sock.bind(f"tcp://127.0.0.1:{port}")

    def take(self, n: int, timeout_ms: int = 30_000) -> list[dict]:
        out = []
        while len(out) < n and self.sock.poll(timeout_ms):
            out.append(msgpack.unpackb(self.sock.recv(), raw=False))
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def send(endpoint: str, keys: Path, name: str | None, source: str, n: int, timeout_s: float = 20.0):
    client = {} if name is None else {"curve_client_key": str(keys / "private" / f"{name}.key_secret"),
                                      "curve_server_key": str(keys / "private" / "daemon.key")}
    items = (Item(np.full(SHAPE, i, np.uint16), {}) for i in range(n))
    return run_producer(items, endpoint, source=source, run=1, frames=n, timeout_s=timeout_s,
                        linger_ms=5000, **client)


def test_authorised_producer_is_served_and_unauthorised_peers_are_refused_and_counted(tmp_path, keys):
    in_port, res_port = free_port(), free_port()
    cfg = config_from_dict({
        "model": {"preset": "classical"},
        "pipeline": {"frame_shape": list(SHAPE), "dtype": "uint16", "batch_size": 4,
                     "max_batch_delay_ms": 10, "buffers": 2, "device": "cpu"},
        "ingest": {"sockets": [{"endpoint": f"tcp://127.0.0.1:{in_port}", "mode": "bind"}]},
        "output": {"results_endpoint": f"tcp://127.0.0.1:{res_port}"},
        "security": {"curve_server_secret": str(keys / "private" / "daemon.key_secret"),
                     "curve_authorized_dir": str(keys / "authorized")},
    }, "<test_security>")
    consumer = CurveConsumer(res_port, keys)
    worker = Worker(cfg)
    try:
        endpoint = worker.endpoints[0]
        assert send(endpoint, keys, "producer", "good", 8).frames == 8
        got = consumer.take(8)
        assert sorted(r["seq"] for r in got) == list(range(8)) and {r["source"] for r in got} == {"good"}

        # a CURVE client whose key is not in the authorised folder, and a plain ZMTP client
        with pytest.raises(ProducerError, match="no consumer"):
            send(endpoint, keys, "intruder", "intruder", 4, timeout_s=1.5)
        with pytest.raises(ProducerError, match="no consumer"):
            send(endpoint, keys, None, "plain", 4, timeout_s=1.5)
        # a plain producer that ignores IMMEDIATE: its frames must never reach the pipeline
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(endpoint)
        push.send_multipart([b"x"])  # queued until a handshake completes, which never happens
        push.close(linger=500)
        ctx.term()

        assert send(endpoint, keys, "producer", "good2", 4).frames == 4  # still serving
        assert len(consumer.take(4)) == 4
    finally:
        final = worker.stop()
        consumer.close()
    assert final["received"] == final["processed"] == 12
    assert final["rejected"] == {}
    assert final["auth_failures"] >= 3  # intruder, plain sender, plain socket (each may retry)
    m = metrics_from([final])
    assert m.value("peaknet_auth_failures_total") == final["auth_failures"]


def test_an_unauthorised_results_consumer_gets_nothing(tmp_path, keys):
    res_port = free_port()
    cfg = config_from_dict({
        "model": {"preset": "classical"},
        "pipeline": {"frame_shape": list(SHAPE), "dtype": "uint16", "batch_size": 2, "buffers": 2,
                     "device": "cpu"},
        "ingest": {"sockets": [{"endpoint": f"tcp://127.0.0.1:{free_port()}", "mode": "bind"}]},
        "output": {"results_endpoint": f"tcp://127.0.0.1:{res_port}", "results_sndhwm": 4},
        "security": {"curve_server_secret": str(keys / "private" / "daemon.key_secret"),
                     "curve_authorized_dir": str(keys / "authorized")},
    }, "<test_security>")
    intruder = CurveConsumer(res_port, keys, name="intruder")
    worker = Worker(cfg)
    try:
        deadline = time.monotonic() + 30
        while (stats := worker.stats())["auth_failures"] < 2:  # the worker reconnects; each is refused
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)  # polling a counter that has no event to wait on
        assert intruder.take(1, timeout_ms=200) == []
    finally:
        worker.stop()
        intruder.close()
    assert stats["auth_failures"] >= 2
