"""Structured logging: one structlog setup for the daemon, the library and stdlib loggers.

JSON lines for journald and log shippers, a console renderer for people at a terminal. Stdlib
loggers (Ray, urllib3, ...) go through the same processors so every line has one format.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, TextIO

import structlog

from .config import LoggingConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _is_console(fmt: str, stream: TextIO) -> bool:
    return fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())


def _renderer(fmt: str, stream: TextIO) -> Any:
    if _is_console(fmt, stream):
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (test runners and daemons swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(cfg: LoggingConfig, stream: TextIO | None = None) -> None:
    """Configure structlog and route stdlib logging through it (idempotent: replaces handlers).
    Logs go to `stream`, by default to stderr (stdout stays free for a CLI's output)."""
    level = _LEVELS[cfg.level]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(cfg.format, stream if stream is not None else sys.stderr),
        ],
    )
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


class WorkerLogWriter:
    """Writes the output Ray forwards from actor processes as whole JSON lines, one write per
    batch under the log handler's lock.

    Why: Ray's own printer prefixes each line with "(PipelineActor pid=N)" and writes a line and
    its newline in two calls, so a supervisor event written between them lands on the same line:
    a log shipper then gets neither event. Here an actor's line that is a JSON object (every
    structlog event) passes unchanged; anything else (a traceback, a library's print) becomes an
    event of its own, `worker_output`, with the line, the process id and the actor's name (level
    warning from stderr, where tracebacks and library warnings go; info from stdout).
    Ray's de-duplication of repeated lines is not applied: every line is kept."""

    def __init__(self, handler: logging.Handler, clock: Callable[[], float] = time.time,
                 autoscaler_events: Callable[[list[str]], Iterable[str]] = lambda lines: ()):
        self.handler = handler
        self._clock = clock
        self._autoscaler_events = autoscaler_events

    def __call__(self, data: Mapping[str, Any]) -> None:
        lines = data.get("lines", ())
        if data.get("pid") == "autoscaler":  # its status report every few seconds: only its events
            lines = self._autoscaler_events(list(lines))
        out = [self._line(line, data) for line in lines if line.strip()]
        if not out:
            return
        stream = getattr(self.handler, "stream", None) or sys.stderr
        self.handler.acquire()
        try:
            stream.write("".join(out))
            stream.flush()
        except (OSError, ValueError):  # a closed stream: the daemon is going down, nothing to do
            pass
        finally:
            self.handler.release()

    def _line(self, line: str, data: Mapping[str, Any]) -> str:
        text = line.rstrip("\r\n")
        if text.startswith("{") and text.endswith("}"):
            try:
                if isinstance(json.loads(text), dict):
                    return text + "\n"
            except ValueError:
                pass
        stamp = datetime.datetime.fromtimestamp(self._clock(), datetime.timezone.utc).isoformat()
        event = {"event": "worker_output", "line": text, "pid": data.get("pid"),
                 "actor": data.get("actor_name") or data.get("task_name") or None,
                 "stream": "stderr" if data.get("is_err") else "stdout",
                 "level": "warning" if data.get("is_err") else "info",  # stderr that is no event: a warning or a traceback
                 "logger": "ray.worker", "timestamp": stamp.replace("+00:00", "Z")}
        return json.dumps(event) + "\n"


def route_worker_logs(cfg: LoggingConfig) -> bool:
    """After `ray.init`: print what Ray forwards from worker processes through `WorkerLogWriter`,
    when the logs are JSON (a console keeps Ray's own "(PipelineActor pid=N)" lines). Uses Ray's
    stream dispatcher (`ray._private.worker`, Ray 2.x); returns False and changes nothing when
    that is not there or Ray forwards nothing (`log_to_driver` off)."""
    root = logging.getLogger()
    if not root.handlers or _is_console(cfg.format, getattr(root.handlers[0], "stream", None) or sys.stderr):
        return False
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        names = [name for name, _ in dispatcher.handlers]
    except (ImportError, AttributeError):
        return False
    if "ray_print_logs" not in names:
        return False
    dispatcher.remove_handler("ray_print_logs")
    events = getattr(ray_worker, "filter_autoscaler_events", lambda lines: ())
    dispatcher.add_handler("ray_print_logs", WorkerLogWriter(root.handlers[0], autoscaler_events=events))
    return True


def get_logger(name: str) -> Any:
    """A structlog logger bound to `name` (the stdlib logger name)."""
    return structlog.get_logger(name)


class RateLimitedLog:
    """Says whether a keyed message may be logged now: at most once per key per interval, so a
    flood of identical rejections costs one line per interval; suppressed counts are kept."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = float(interval_s)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def should_log(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is None or now - last >= self.interval_s:
                self._last[key] = now
                return True
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False

    def take_suppressed(self, key: str) -> int:
        """How many messages for `key` were suppressed since the last call (then resets)."""
        with self._lock:
            return self._suppressed.pop(key, 0)
