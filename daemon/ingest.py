"""ZeroMQ ingest: one PULL socket per thread, messages -> validated frames or counted rejections.

A `SocketReader` owns its socket (ZMQ sockets are not thread-safe) and never copies a payload:
it hands a zero-copy view of the received buffer to `on_frame`, which copies it once, straight
into the current pinned batch slot. Every message ends in exactly one of `on_frame`,
`on_control` or `on_reject`, so nothing received is lost silently.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from .config import SocketConfig
from .wire import Header, NpzDecoder, Rejected, check_frame, decode_header


@dataclass
class FrameTag:
    """What travels with a frame through the pipeline and comes back with its peaks."""

    source: str
    seq: int
    run: int | str
    timestamp_ns: int
    meta: dict[str, Any] = field(default_factory=dict)
    received_at: float = 0.0  # time.perf_counter() at receive


OnFrame = Callable[[np.ndarray, FrameTag], None]
OnControl = Callable[[Header], None]
OnReject = Callable[[str, str], None]


def socket_endpoint(sock: SocketConfig, actor_index: int) -> str:
    """The endpoint this actor uses: in bind mode each actor binds base port + its index."""
    if sock.mode != "bind" or not sock.endpoint.startswith("tcp://"):
        return sock.endpoint
    host, _, port = sock.endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit():
        raise ValueError(f"bind endpoint needs a numeric port: {sock.endpoint}")
    return f"tcp://{host}:{int(port) + actor_index}"


class SocketReader:
    """Receives `peaknet/1` or lclstreamer `.npz` messages on one PULL socket."""

    def __init__(self, ctx: zmq.Context, sock: SocketConfig, endpoint: str,
                 frame_shape: tuple[int, ...], dtype: str,
                 on_frame: OnFrame, on_control: OnControl, on_reject: OnReject,
                 secure: Callable[[zmq.Socket], None] | None = None):
        self.cfg, self.endpoint = sock, endpoint
        self.frame_shape, self.dtype = tuple(frame_shape), dtype
        self.on_frame, self.on_control, self.on_reject = on_frame, on_control, on_reject
        self._npz = NpzDecoder(frame_shape, dtype, sock.max_message_bytes, endpoint)
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
        """Dispatch one message; every outcome is reported through a callback."""
        size = sum(len(p.buffer) for p in parts)
        try:
            if size > self.cfg.max_message_bytes:
                raise Rejected("oversize", f"{size} bytes > {self.cfg.max_message_bytes}")
            if self.cfg.format == "lclstreamer-npz":
                self._handle_npz(parts, received_at)
            else:
                self._handle_peaknet(parts, received_at)
        except Rejected as rej:
            self.on_reject(rej.reason, rej.detail)

    def _handle_peaknet(self, parts: list[zmq.Frame], received_at: float) -> None:
        header = decode_header(parts[0].buffer)
        if header.type != "frame":
            if len(parts) != 1:
                raise Rejected("wrong_parts", f"{header.type} has {len(parts)} parts, expected 1")
            self.on_control(header)
            return
        if len(parts) != 2:
            raise Rejected("wrong_parts", f"frame has {len(parts)} parts, expected 2")
        array = check_frame(header, parts[1].buffer, self.frame_shape, self.dtype)
        self.on_frame(array, FrameTag(header.source, header.seq, header.run, header.timestamp_ns,
                                      header.meta, received_at))

    def _handle_npz(self, parts: list[zmq.Frame], received_at: float) -> None:
        if len(parts) != 1:
            raise Rejected("wrong_parts", f"npz message has {len(parts)} parts, expected 1")
        for header, array in self._npz.decode(parts[0].buffer):
            self.on_frame(array, FrameTag(header.source, header.seq, header.run,
                                          header.timestamp_ns, header.meta, received_at))
