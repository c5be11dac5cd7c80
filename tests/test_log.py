"""Logging: JSON lines with ISO UTC timestamps, stdlib routed through, rate limiting."""

from __future__ import annotations

import io
import json
import logging

import pytest

from peaknet_daemon.config import LoggingConfig
from peaknet_daemon.log import RateLimitedLog, configure_logging, get_logger


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_and_stdlib(restore_logging):
    buf = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=buf)
    get_logger("peaknet.test").info("batch done", frames=16)
    get_logger("peaknet.test").debug("hidden")
    logging.getLogger("thirdparty.lib").warning("from stdlib %d", 3)
    lines = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["event"] == "batch done" and lines[0]["frames"] == 16 and lines[0]["level"] == "info"
    assert lines[0]["logger"] == "peaknet.test" and lines[0]["timestamp"].endswith("Z")
    assert lines[1]["event"] == "from stdlib 3" and lines[1]["level"] == "warning"


def test_console_renderer(restore_logging):
    buf = io.StringIO()
    configure_logging(LoggingConfig(format="console", level="debug"), stream=buf)
    get_logger("x").debug("hello", n=1)
    text = buf.getvalue()
    assert "hello" in text and "n=1" in text
    with pytest.raises(ValueError):
        json.loads(text)


def test_rate_limited_log():
    now = [0.0]
    rl = RateLimitedLog(10.0, clock=lambda: now[0])
    assert rl.should_log("wrong_shape")
    assert not rl.should_log("wrong_shape")
    assert rl.should_log("not_msgpack")  # keys are independent
    now[0] = 9.9
    assert not rl.should_log("wrong_shape")
    assert rl.take_suppressed("wrong_shape") == 2 and rl.take_suppressed("wrong_shape") == 0
    now[0] = 10.0
    assert rl.should_log("wrong_shape")
