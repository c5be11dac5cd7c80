"""The PUSH side of `peaknet/1`: one socket, `start`, paced frames, `end` with the count.

Every producer (random, bragg, replay) is an iterator of `Item`s handed to `run_producer`,
which tests and other packages call in-process as well as the CLI. Sends never block for ever:
each waits for POLLOUT at most `timeout_s` (a consumer that never connects, or stops reading,
becomes a `ProducerError`), and closing waits up to `linger_ms` for queued frames to leave, so
what was counted as sent was delivered.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import zmq

from peaknet_daemon.security import curve_client
from .errors import ProducerError
from .formats import make_encoder
from .item import Item
from .pacing import Pacer
from .progress import Progress, Summary

ZERO_COPY_BYTES = 64 * 1024  # below this, copying is cheaper than zero-copy bookkeeping


@dataclass
class SenderOptions:
    endpoint: str
    bind: bool = False
    hwm: int = 32
    linger_ms: int = 60_000
    timeout_s: float = 10.0
    curve_client_key: str = ""  # this producer's .key_secret file (peaknet-keygen)
    curve_server_key: str = ""  # the daemon's public .key file
    io_threads: int = 1  # ZMQ I/O threads; each peer connection is served by one of them


class Sender:
    """Owns a PUSH socket (bound or connected) in its own context, so closing it waits for its
    own queued messages only."""

    def __init__(self, opts: SenderOptions, stop: threading.Event | None = None):
        self.opts, self.stop = opts, stop
        if opts.io_threads < 1:
            raise ProducerError(f"--io-threads must be >= 1, got {opts.io_threads}")
        self.ctx = zmq.Context(io_threads=opts.io_threads)
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, opts.hwm)
        self.sock.setsockopt(zmq.LINGER, opts.linger_ms)
        # Queue only to completed connections: otherwise a connect to nobody "succeeds".
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        try:
            if opts.curve_client_key or opts.curve_server_key:
                if not (opts.curve_client_key and opts.curve_server_key):
                    raise ValueError("CURVE needs both --curve-client-key and --curve-server-key")
                curve_client(self.sock, opts.curve_client_key, opts.curve_server_key)
        except (OSError, ValueError) as exc:
            self.ctx.destroy(linger=0)
            raise ProducerError(f"CURVE keys: {exc}") from None
        try:
            (self.sock.bind if opts.bind else self.sock.connect)(opts.endpoint)
        except zmq.ZMQError as exc:
            self.ctx.destroy(linger=0)
            verb = "bind to" if opts.bind else "connect to"
            raise ProducerError(f"cannot {verb} {opts.endpoint}: {exc}") from None
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLOUT)
        self.link_dead = False

    def send(self, parts: list, honour_stop: bool = True) -> bool:
        """Send one message once the socket can take it. False when `stop` was set while waiting
        (the message is not sent); ProducerError after `timeout_s` without progress."""
        deadline = time.monotonic() + self.opts.timeout_s
        copy = sum(len(p) for p in parts) < ZERO_COPY_BYTES
        while True:
            if honour_stop and self.stop is not None and self.stop.is_set():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                self.link_dead = True
                role = "connected to" if self.opts.bind else "at"
                raise ProducerError(f"no consumer {role} {self.opts.endpoint} accepted a message "
                                    f"within {self.opts.timeout_s:g} s")
            if self.poller.poll(min(left, 0.1) * 1000):
                try:
                    self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
                    return True
                except zmq.Again:
                    continue

    def close(self) -> float:
        """Close, waiting up to linger for queued messages; returns the seconds it took."""
        t0 = time.monotonic()
        self.sock.close(linger=0 if self.link_dead else self.opts.linger_ms)
        self.ctx.term()
        took = time.monotonic() - t0
        if not self.link_dead and self.opts.linger_ms >= 0 and took * 1000 >= 0.95 * self.opts.linger_ms > 0:
            print(f"warning: linger of {self.opts.linger_ms} ms ran out; frames still queued for "
                  f"{self.opts.endpoint} may be lost", file=sys.stderr)
        return took


def run_producer(items: Iterable[Item], endpoint: str, *, bind: bool = False, source: str = "p0",
                 run: int | str = 0, frames: int | None = None, rate: float = 0.0, hwm: int = 32,
                 linger_ms: int = 60_000, timeout_s: float = 10.0,
                 stop: threading.Event | None = None,
                 on_sent: Callable[[int, Item], None] | None = None,
                 progress: bool = False, start_meta: dict | None = None,
                 curve_client_key: str = "", curve_server_key: str = "",
                 format: str = "peaknet/1", io_threads: int = 1,
                 compression: str | None = None) -> Summary:
    """Send `start`, up to `frames` items (all when None) at `rate` Hz (0 = as fast as
    possible), then `end` with the count, also when stopped or when the items fail midway.
    `on_sent(seq, item)` runs after each frame is handed to the socket. `format` names the
    wire format (formats.ENCODERS), `compression` its compression (formats.COMPRESSIONS; None =
    the format's default)."""
    try:
        encoder = make_encoder(format, compression)
    except ValueError as exc:
        raise ProducerError(str(exc)) from None
    items = iter(items)
    first = next(items, None)
    if first is not None:
        items = itertools.chain([first], items)
    sender = Sender(SenderOptions(endpoint, bind, hwm, linger_ms, timeout_s, curve_client_key,
                                  curve_server_key, io_threads), stop)
    pacer = Pacer(rate, stop)
    bar = Progress(progress, frames)
    count = nbytes = 0
    t_first: float | None = None
    started = False
    try:
        shape_of = np.asarray(first.data) if first is not None else np.zeros((1, 1, 1), np.uint16)
        started = sender.send(encoder.start(source, run, dict(start_meta or {}), shape_of, frames))
        if not started:
            raise ProducerError(f"stopped before a consumer at {endpoint} took the start message")
        for seq, item in enumerate(items):
            if frames is not None and seq >= frames:
                break
            if not pacer.wait(seq):
                break
            if t_first is None:
                t_first = time.monotonic()
            parts = encoder.frame(item.data, source, seq, run, item.timestamp_ns, item.meta)
            if not sender.send(parts):
                break
            count += 1
            nbytes += sum(len(p) for p in parts)
            if on_sent is not None:
                on_sent(seq, item)
            bar.update(count, nbytes)
        if rate and count and not (stop is not None and stop.is_set()):
            pacer.wait(count)  # the last frame owns a full period, so n frames take n / rate
    finally:
        bar.update(count, nbytes, force=True)
        bar.close()
        try:
            if started and not sender.link_dead:
                sender.send(encoder.end(source, run, count), honour_stop=False)
        finally:
            sender.close()
    seconds = time.monotonic() - t_first if t_first is not None else 0.0
    return Summary(source=source, run=run, frames=count, bytes=nbytes, seconds=seconds,
                   rate_asked=rate)
