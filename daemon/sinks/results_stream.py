"""The `peaknet-result/1` stream: one msgpack message per frame on a ZMQ PUSH or PUB socket.

PUSH is lossless: when no consumer keeps up, `send` blocks (backpressure reaches the pipeline)
and warns periodically. PUB never blocks: results nobody subscribed to, or that overflow the
send HWM, are dropped and counted. PUB is an XPUB with NODROP so both cases are visible.
The daemon runs this socket in a process of its own (results_sender.py).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import zmq

from ..config import OutputConfig
from ..log import get_logger
from ..wire import encode_result
from . import SinkError

log = get_logger(__name__)


class ResultStream:
    """Sends result dicts (keys per DESIGN.md) on the configured endpoint. One sending thread."""

    def __init__(self, cfg: OutputConfig, zmq_context: zmq.Context | None = None,
                 warn_interval_s: float = 10.0, linger_ms: int = 5000, poll_ms: int = 100,
                 clock: Callable[[], float] = time.monotonic,
                 secure: Callable[[zmq.Socket], None] | None = None):
        if not cfg.results_endpoint:
            raise ValueError("output.results_endpoint is empty: no results stream configured")
        self.endpoint, self.mode = cfg.results_endpoint, cfg.results_mode
        self._own_ctx = zmq_context is None
        self._ctx = zmq_context if zmq_context is not None else zmq.Context()
        self._warn_interval_s, self._linger_ms, self._poll_ms = warn_interval_s, linger_ms, poll_ms
        self._clock = clock
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._subscriptions: set[bytes] = set()
        self.sent = 0
        self.dropped: dict[str, int] = {}
        self.blocked_s = 0.0
        sock = self._ctx.socket(zmq.PUSH if self.mode == "push" else zmq.XPUB)
        try:
            sock.setsockopt(zmq.SNDHWM, cfg.results_sndhwm)
            sock.setsockopt(zmq.LINGER, linger_ms)
            if self.mode == "pub":
                sock.setsockopt(zmq.XPUB_NODROP, 1)
            if secure is not None:
                secure(sock)  # CURVE (security.py): before bind/connect
            if cfg.results_bind:
                sock.bind(self.endpoint)
                self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.endpoint
            else:
                sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            if self._own_ctx:
                self._ctx.term()
            raise SinkError("results_stream", f"cannot {'bind' if cfg.results_bind else 'connect'} "
                                              f"{cfg.results_endpoint}: {exc}") from exc
        self._sock: zmq.Socket | None = sock
        log.info("results stream", endpoint=self.endpoint, mode=self.mode, bind=cfg.results_bind)

    # ------------------------------------------------------------------------------------------

    def send(self, result: dict[str, Any]) -> bool:
        """Send one result; True when queued. PUSH blocks while the consumer is behind; PUB drops.
        Returns False when dropped (PUB) or when the stream is closing."""
        return self.send_encoded(encode_result(result))

    def send_encoded(self, msg: bytes) -> bool:
        """`send` for a result already encoded (`wire.encode_result`)."""
        with self._lock:
            if self._sock is None or self._closing.is_set():
                self._drop("closed")
                return False
            if self.mode == "pub":
                return self._send_pub(msg)
            return self._send_push(msg)

    def _try_send(self, sock: zmq.Socket, msg: bytes) -> bool:
        """One non-blocking send; False when the socket is at its HWM."""
        try:
            sock.send(msg, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.sent += 1
        return True

    def _send_push(self, msg: bytes) -> bool:
        sock = self._sock
        assert sock is not None
        if self._try_send(sock, msg):
            return True
        start = last_warn = self._clock()
        try:
            while not self._closing.is_set():
                if sock.poll(self._poll_ms, zmq.POLLOUT) and self._try_send(sock, msg):
                    return True
                now = self._clock()
                if now - last_warn >= self._warn_interval_s:
                    last_warn = now
                    log.warning("results stream blocked: no consumer is keeping up",
                                endpoint=self.endpoint, blocked_s=round(now - start, 1))
            self._drop("closed")
            return False
        finally:
            self.blocked_s += self._clock() - start

    def _send_pub(self, msg: bytes) -> bool:
        sock = self._sock
        assert sock is not None
        self._read_subscriptions(sock)
        if not self._subscriptions:
            self._drop("no_subscriber")
            return False
        if self._try_send(sock, msg):
            return True
        self._drop("hwm")
        return False

    def _read_subscriptions(self, sock: zmq.Socket) -> None:
        """XPUB hands us (un)subscribe messages: b'\\x01topic' / b'\\x00topic'."""
        while True:
            try:
                event = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event[:1] == b"\x01":
                self._subscriptions.add(event[1:])
            elif event[:1] == b"\x00":
                self._subscriptions.discard(event[1:])

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    # ------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent, "dropped": dict(self.dropped), "blocked_s": self.blocked_s}

    def close(self, timeout: float | None = None) -> bool:
        """Stop sending (a blocked `send` returns within poll_ms), then close, lingering up to
        `timeout` s (default: the stream's linger) so queued results still reach a consumer.
        Idempotent; safe from another thread."""
        self._closing.set()
        with self._lock:
            sock, self._sock = self._sock, None
            if sock is None:
                return True
            sock.close(self._linger_ms if timeout is None else int(max(0.0, timeout) * 1e3))
            if self._own_ctx:
                self._ctx.term()
        return True
