"""The results stream in a process of its own, so that what a killed actor sent is known exactly.

A ZMQ `send` only queues a message in the sending process; the socket's I/O thread writes it
out later. When a GPU process is killed (`kill -9`, the OOM killer, a Ray actor kill), what
its socket still held is lost, and no tally written by that process can say how much: the
write and the send are two acts, and a kill can fall between them. So the GPU process does not
own the socket. It writes each result into a pipe, where the kernel keeps it even when the
writer dies, and counts it once the write returned. At most `output.results_sndhwm` results
wait in the pipe (a semaphore the sender releases as it takes them), so a consumer that is
behind holds the pipeline back as before. A sender process takes results off the
pipe, sends them and counts them per run. When the GPU process dies, the sender reads the pipe
to its end, sends the rest, writes its count next to the worker's tally file (`*.sent.msgpack`,
`final: true`) and lingers until the consumer has everything. For a dead incarnation the
supervisor takes `processed` and the per-run counts from that file (`accounting.merge_sent`).

```
GPU process, results thread --pipe: [source, run, seq, n_peaks, hit, result]--> sender process
sender process --ZMQ PUSH or PUB (peaknet-result/1, results_stream.py)--> consumer
```

The sender is not tied to its parent's life (unlike the ingest processes): it ends at the
pipe's end of file. With the parent gone and the consumer not reading, it gives up after
`ORPHAN_GRACE_S` (the rest is counted as dropped, `closed`). SIGUSR1 from the GPU process means
give up now. SIGTERM and SIGINT are ignored, as in the ingest processes: a terminal or a process
manager may signal the whole process group, and the GPU process says when its sender is done.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any, Optional

import msgpack

from ..accounting import count_in_run, run_rows, write_tally_file
from ..config import Config, bind_endpoint
from ..log import configure_logging, get_logger
from ..security import SocketGuard
from ..wire import encode_result
from . import SinkError
from .base import SinkContext
from .results_stream import ResultStream

log = get_logger(__name__)

START_S = 60.0  # the sender must have its socket open within this
ORPHAN_GRACE_S = 5.0  # parent gone and the consumer not reading: give up after this
BIND_RETRY_S = 15.0  # bind mode: the previous incarnation's sender may still hold the port
# shared counters, written by the sender, read by the worker's stats()
TAKEN, SENT, DROP_CLOSED, DROP_NO_SUBSCRIBER, DROP_HWM, AUTH_FAILURES, DISCONNECTS = range(7)
COUNTERS = 7
DROP_COLUMNS = {"closed": DROP_CLOSED, "no_subscriber": DROP_NO_SUBSCRIBER, "hwm": DROP_HWM}


class ResultSender:
    """The GPU process's side: a `ResultSink` (base.py) that hands each result to the sender
    process through a pipe. `put` blocks while `results_sndhwm` results wait in the pipe, so a
    consumer that is behind holds the pipeline back, as a PUSH socket does."""

    def __init__(self, cfg: Config, index: int, sent_tally: Optional[str] = None, start_s: float = START_S):
        self.cfg, self.index, self._sent_tally = cfg, index, sent_tally
        self._mp = multiprocessing.get_context("spawn")
        self.counters = self._mp.RawArray("q", COUNTERS)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._room: Any = None  # semaphore: results the pipe may still take
        self._conn: Optional[Connection] = None
        self.process: Optional[multiprocessing.process.BaseProcess] = None
        self.endpoint = ""
        self.put_count = 0  # results whose pipe write returned
        self._lost = 0  # results a sender that died had not taken
        self._base = [0] * COUNTERS  # counts of senders that died (their counters start again at 0)
        self._closed_here = 0  # results put after close
        self.restarts = 0
        self._start(start_s)

    @classmethod
    def from_config(cls, cfg: Config, ctx: SinkContext) -> "ResultSender | None":
        """The stream of `output.results_endpoint` (None when empty); in bind mode actor i binds
        the port + i, like the ingest sockets."""
        if not cfg.output.results_endpoint:
            return None
        return cls(cfg, ctx.index, ctx.sent_tally)

    def _start(self, start_s: float) -> None:
        out = self.cfg.output
        endpoint = bind_endpoint(out.results_endpoint, self.index) if out.results_bind else out.results_endpoint
        parent, child = self._mp.Pipe(duplex=True)
        room = self._mp.Semaphore(out.results_sndhwm)
        process = self._mp.Process(target=sender_main, name=f"peaknet-results-{self.index}", daemon=True,
                                   args=(self.cfg, endpoint, child, room, self.counters, self._sent_tally,
                                         os.getpid()))
        process.start()
        child.close()
        try:
            if not parent.poll(start_s):
                raise SinkError("results_stream", f"the sender process did not start within {start_s:.0f} s")
            msg = msgpack.unpackb(parent.recv_bytes(), raw=False)
        except (EOFError, OSError) as exc:
            msg = ["error", f"the sender process ended at start (exit code {process.exitcode}): {exc!r}"]
        except SinkError:
            process.kill()
            raise
        if msg[0] != "ready":
            process.join(2.0)
            parent.close()
            raise SinkError("results_stream", msg[1])
        self.endpoint, self._conn, self.process, self._room = msg[1], parent, process, room
        log.info("results_sender_started", endpoint=self.endpoint, pid=process.pid, mode=out.results_mode)

    # ResultSink (base.py)
    def wants_frame(self, n_peaks: int) -> bool:
        return False

    def put(self, result: dict[str, Any], frame: Any = None) -> None:
        """Write one result into the pipe; it counts as sent once this returns. A sender that
        died is started again, and the results it had not taken are counted as dropped."""
        msg = msgpack.packb([result["source"], result["run"], result["seq"], int(result["n_peaks"]),
                             bool(result["hit"]), encode_result(result)], use_bin_type=True)
        while True:
            room = self._room
            if room is not None and room.acquire(timeout=0.2):
                break
            if self._closing.is_set():
                break  # the sender has given up: it takes everything now
            process = self.process
            if process is not None and not process.is_alive():
                with self._lock:
                    if self.process is process:
                        self._replace_dead_sender(RuntimeError(f"exit code {process.exitcode}"))
        with self._lock:
            if self._conn is None:
                self._closed_here += 1
                return
            try:
                self._conn.send_bytes(msg)
            except OSError as exc:
                self._replace_dead_sender(exc)
                assert self._conn is not None
                self._conn.send_bytes(msg)
            self.put_count += 1

    def _replace_dead_sender(self, exc: BaseException) -> None:
        lost = max(0, self.put_count - int(self.counters[TAKEN]))
        self._lost += lost
        log.error("results_sender_died", pid=self.process.pid if self.process else None, error=repr(exc),
                  results_lost=lost)
        if self._conn is not None:
            self._conn.close()
        for col in range(COUNTERS):
            self._base[col] += int(self.counters[col])
        self.counters[:] = [0] * COUNTERS
        self.put_count = 0
        self.restarts += 1
        self._start(START_S)

    def close_run(self, run: Any, timeout: float = 0.0) -> list[str]:
        return []

    def close(self, timeout: float) -> bool:
        """End of file for the sender: it sends what the pipe holds, writes its count and
        lingers up to `timeout` s for the consumer. `timeout` 0 gives up at once without waiting
        (SIGUSR1: the rest is dropped and counted); when the time is up it gives up the same
        way. Idempotent; safe from another thread."""
        process = self.process
        self._closing.set()
        if timeout <= 0:
            _give_up(process)  # unblocks a put waiting on a consumer that is gone
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.send_bytes(msgpack.packb(["close", int(max(0.0, timeout) * 1e3)]))
                except OSError:
                    pass
                conn.close()
        if process is None:
            return True
        if timeout <= 0:
            return not process.is_alive()  # it finishes on its own; a later close() waits for it
        process.join(timeout)
        if not process.is_alive():
            return True
        _give_up(process)  # time is up: drop the rest (counted), write the count, exit
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
        return False

    # read by the worker's stats()
    def _count(self, col: int) -> int:
        return self._base[col] + int(self.counters[col])

    @property
    def dropped(self) -> dict[str, int]:
        out = {reason: self._count(col) for reason, col in DROP_COLUMNS.items() if self._count(col)}
        if self._closed_here:
            out["closed"] = out.get("closed", 0) + self._closed_here
        if self._lost:
            out["sender_died"] = self._lost
        return out

    @property
    def sent(self) -> int:
        return self._count(SENT)

    @property
    def auth_failures(self) -> int:
        return self._count(AUTH_FAILURES)

    @property
    def disconnects(self) -> int:
        return self._count(DISCONNECTS)


def _give_up(process: Optional[multiprocessing.process.BaseProcess]) -> None:
    if process is not None and process.pid is not None and process.is_alive():
        try:
            os.kill(process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass


class _SentTally:
    """What the sender took off the pipe: results, peaks, hits, and per (source, run) the
    count and seq range (the worker's `runs` layout)."""

    def __init__(self) -> None:
        self.processed = self.peaks = self.hits = 0
        self.runs: OrderedDict[tuple[str, Any], list[int]] = OrderedDict()

    def count(self, source: str, run: Any, seq: int, n_peaks: int, hit: bool) -> None:
        self.processed += 1
        self.peaks += n_peaks
        self.hits += bool(hit)
        count_in_run(self.runs, source, run, seq)

    def write(self, path: str, dropped: dict[str, int]) -> None:
        data = {"final": True, "processed": self.processed, "peaks": self.peaks, "hits": self.hits,
                "runs": run_rows(self.runs), "results_dropped": dropped}
        write_tally_file(path, data)


def _open_stream(cfg: Config, endpoint: str, ctx: Any, guard: SocketGuard) -> ResultStream:
    """The socket; in bind mode retried while the port is still taken (a dead incarnation's
    sender lingering on it)."""
    out = dataclasses.replace(cfg.output, results_endpoint=endpoint)
    give_up = time.monotonic() + (BIND_RETRY_S if out.results_bind else 0.0)
    while True:
        try:
            return ResultStream(out, ctx, secure=guard.secure)
        except SinkError as exc:
            in_use = "Address already in use" in str(exc)
            if not in_use or time.monotonic() >= give_up:
                raise
            time.sleep(0.2)


def sender_main(cfg: Config, endpoint: str, conn: Connection, room: Any, counters: Any,
                sent_tally: Optional[str], parent_pid: int) -> None:
    """The body of the sender process (see the module docstring)."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the GPU process says when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    term = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: term.set())
    configure_logging(cfg.logging)
    ctx = zmq.Context()
    guard = SocketGuard(cfg.security, ctx)
    try:
        stream = _open_stream(cfg, endpoint, ctx, guard)
    except (SinkError, ValueError) as exc:
        conn.send_bytes(msgpack.packb(["error", str(exc)]))
        guard.close()
        ctx.term()
        return
    conn.send_bytes(msgpack.packb(["ready", stream.endpoint]))
    finished = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stream, guard, counters, term, finished, parent_pid),
                               name="results-sender-watch", daemon=True)
    watcher.start()
    tally = _SentTally()
    linger_ms: Optional[int] = None
    try:
        while True:
            try:
                msg = msgpack.unpackb(conn.recv_bytes(), raw=False)
            except (EOFError, OSError):
                break  # the GPU process closed the pipe, or died: everything written is taken
            if msg[0] == "close":
                linger_ms = msg[1]
                continue
            room.release()
            source, run, seq, n_peaks, hit, payload = msg
            counters[TAKEN] += 1
            stream.send_encoded(payload)
            tally.count(source, run, seq, n_peaks, hit)
            _publish(stream, counters)
    finally:
        _publish(stream, counters)
        if sent_tally:
            try:
                tally.write(sent_tally, dict(stream.dropped))
            except OSError as exc:
                log.error("results_sender_tally_failed", path=sent_tally, error=str(exc))
        stream.close(0.0 if term.is_set() else None if linger_ms is None else linger_ms / 1e3)
        finished.set()
        watcher.join()
        _publish(stream, counters, guard)
        guard.close()
        ctx.term()


def _publish(stream: ResultStream, counters: Any, guard: Optional[SocketGuard] = None) -> None:
    counters[SENT] = stream.sent
    for reason, col in DROP_COLUMNS.items():
        counters[col] = stream.dropped.get(reason, 0)
    if guard is not None:
        counters[AUTH_FAILURES], counters[DISCONNECTS] = guard.auth_failures, guard.disconnects


def _watch(stream: ResultStream, guard: SocketGuard, counters: Any, term: threading.Event,
           finished: threading.Event, parent_pid: int) -> None:
    """Refused peers into the shared counters; give up sending on SIGUSR1, or when the
    parent is gone and the consumer has not taken the rest within ORPHAN_GRACE_S."""
    orphaned_at: Optional[float] = None
    while not finished.wait(0.2):
        counters[AUTH_FAILURES], counters[DISCONNECTS] = guard.auth_failures, guard.disconnects
        if orphaned_at is None and os.getppid() != parent_pid:
            orphaned_at = time.monotonic()
        if term.is_set() or (orphaned_at is not None and time.monotonic() - orphaned_at >= ORPHAN_GRACE_S):
            stream.close(0.0)  # a blocked send returns; what is left is dropped as `closed`
            return
