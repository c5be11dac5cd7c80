"""ZeroMQ ingest: one PULL socket and the wire format's source -> frames or counted rejections.

A `SocketReader` owns its socket (ZMQ sockets are not thread-safe) and never copies a payload:
it hands zero-copy views of the received parts to its `FrameSource` (sources/), which writes
each frame once, straight into the current batch slot. Every message ends in frames, a control
event or one `on_reject`, so nothing received is lost silently.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import zmq

from .config import SocketConfig, bind_endpoint
from .sources import FrameOut, FrameTag, SourceSpec, make_source
from .wire import Rejected

OnReject = Callable[[str, str], None]

__all__ = ["FrameTag", "SocketReader", "socket_endpoint"]


def socket_endpoint(sock: SocketConfig, actor_index: int) -> str:
    """The endpoint this actor uses: in bind mode each actor binds base port + its index."""
    return bind_endpoint(sock.endpoint, actor_index) if sock.mode == "bind" else sock.endpoint


class SocketReader:
    """Receives the messages of one PULL socket and decodes them with the socket's format."""

    def __init__(self, ctx: zmq.Context, sock: SocketConfig, endpoint: str,
                 frame_shape: tuple[int, ...], dtype: str, out: FrameOut, on_reject: OnReject,
                 secure: Callable[[zmq.Socket], None] | None = None):
        self.cfg, self.endpoint = sock, endpoint
        self.out, self.on_reject = out, on_reject
        self.source = make_source(SourceSpec(sock, endpoint, tuple(frame_shape), dtype))
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, sock.rcvhwm)
        self.socket.setsockopt(zmq.MAXMSGSIZE, sock.max_message_bytes)  # libzmq drops larger parts unread
        if secure is not None:
            secure(self.socket)  # CURVE options must precede bind/connect
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            (self.socket.bind if sock.mode == "bind" else self.socket.connect)(endpoint)
        except zmq.ZMQError as exc:
            self.socket.close(linger=0)
            raise OSError(f"cannot {sock.mode} ingest socket {endpoint}: {exc.strerror}") from None

    def close(self) -> None:
        self.socket.close(linger=0)

    def run(self, stop: threading.Event, poll_ms: int = 50) -> None:
        """Receive until `stop` is set; closes the socket on the way out."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not stop.is_set():
                if not poller.poll(poll_ms):
                    continue
                while not stop.is_set():
                    try:
                        parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(parts, time.perf_counter())
        finally:
            self.socket.close(linger=0)

    def handle(self, parts: list[zmq.Frame], received_at: float) -> None:
        """Decode one message; every outcome goes to the FrameOut or `on_reject`."""
        views = [p.buffer for p in parts]
        size = sum(len(v) for v in views)
        try:
            if size > self.cfg.max_message_bytes:
                raise Rejected("oversize", f"{size} bytes > {self.cfg.max_message_bytes}")
            self.source.decode(views, received_at, self.out)
        except Rejected as rej:
            self.on_reject(rej.reason, rej.detail)
