"""Test helpers for the producer tests: a PULL receiver thread and free endpoints."""

from __future__ import annotations

import threading

import zmq

from harness import free_port
from peaknet_daemon.wire import check_frame, decode_header


def free_tcp() -> str:
    """A free TCP endpoint on loopback."""
    return f"tcp://127.0.0.1:{free_port()}"


class Receiver(threading.Thread):
    """Collects every message on a PULL socket until `ends` end messages came, `stop` is set or
    nothing arrives for `idle_s`. `frames` holds (Header, ndarray copy), `controls` Headers.
    `ready` is set once bound/connected; `on_frame(n)` runs after each frame."""

    def __init__(self, endpoint: str, bind: bool = True, ends: int = 1, idle_s: float = 20.0,
                 on_frame=None):
        super().__init__(daemon=True)
        self.endpoint, self.bind, self.ends, self.idle_s, self.on_frame = endpoint, bind, ends, idle_s, on_frame
        self.frames: list = []
        self.controls: list = []
        self.ready = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            (sock.bind if self.bind else sock.connect)(self.endpoint)
            self.ready.set()
            n_ends = 0
            while n_ends < self.ends:
                if not sock.poll(int(self.idle_s * 1000)):
                    raise TimeoutError(f"receiver idle for {self.idle_s} s")
                parts = sock.recv_multipart()
                h = decode_header(parts[0])
                if h.type == "frame":
                    self.frames.append((h, check_frame(h, parts[1], h.shape, h.dtype).copy()))
                    if self.on_frame is not None:
                        self.on_frame(len(self.frames))
                else:
                    self.controls.append(h)
                    n_ends += h.type == "end"
        except Exception as exc:  # surfaced by the test through .error
            self.error = exc
            self.ready.set()
        finally:
            sock.close()
            ctx.term()

    def finish(self, timeout: float = 30.0) -> "Receiver":
        self.join(timeout)
        assert not self.is_alive(), "receiver did not finish"
        if self.error is not None:
            raise self.error
        return self
