"""Structured logging: one structlog setup for the daemon, the library and stdlib loggers.

JSON lines for journald and log shippers, a console renderer for people at a terminal. Stdlib
loggers (Ray, urllib3, ...) go through the same processors so every line has one format.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, TextIO

import structlog

from .config import LoggingConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _renderer(fmt: str, stream: TextIO) -> Any:
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    if console:
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
