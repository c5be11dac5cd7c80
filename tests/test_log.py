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


def test_worker_lines_become_whole_json_lines(restore_logging):
    from peaknet_daemon.log import WorkerLogWriter

    buf = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=buf)
    writer = WorkerLogWriter(logging.getLogger().handlers[0], clock=lambda: 0.0)
    writer({"pid": 4242, "actor_name": "PipelineActor", "is_err": True,
            "lines": ['{"event": "batch_done", "frames": 4}', "Traceback (most recent call last):", "",
                      '{"not": "closed"']})
    lines = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert lines[0] == {"event": "batch_done", "frames": 4}  # an actor's event passes unchanged
    assert [ln["line"] for ln in lines[1:]] == ["Traceback (most recent call last):", '{"not": "closed"']
    assert {(ln["event"], ln["pid"], ln["actor"], ln["stream"]) for ln in lines[1:]} == {
        ("worker_output", 4242, "PipelineActor", "stderr")}
    assert lines[1]["timestamp"] == "1970-01-01T00:00:00Z" and lines[1]["level"] == "warning"
    buf.seek(0)
    buf.truncate(0)
    writer({"pid": 7, "is_err": False, "lines": ["progress 10 %"]})
    assert json.loads(buf.getvalue())["level"] == "info"  # stdout: information, not a warning
    buf.seek(0)
    buf.truncate(0)
    writer({"pid": "autoscaler", "lines": ["Resources", "-----", "Usage: 0/1 CPU"]})
    assert buf.getvalue() == ""  # the autoscaler's periodic status is not the daemon's log


RAY_SCRIPT = r"""
import json, logging, sys, threading
import ray
from ray._private import worker as ray_worker
from peaknet_daemon.config import LoggingConfig
from peaknet_daemon.log import configure_logging, get_logger, route_worker_logs

N_EVENTS, N_DRIVER = 300, 600
N_PLAIN = len(range(0, N_EVENTS, 8))
configure_logging(LoggingConfig(format="json", level="info"))
ray.init(address="local", include_dashboard=False, num_cpus=1, log_to_driver=True)
assert route_worker_logs(LoggingConfig(format="json", level="info"))
seen, done = [0], threading.Event()
def count(data):  # registered after the writer: a batch counted here has been written
    seen[0] += sum(1 for line in data.get("lines", ()) if "marker" in line)
    if seen[0] >= N_EVENTS + N_PLAIN:
        done.set()
ray_worker.global_worker_stdstream_dispatcher.add_handler("count", count)

@ray.remote
class Talker:
    def talk(self):
        for i in range(N_EVENTS):
            print(json.dumps({"event": "marker_event", "i": i}), file=sys.stderr, flush=True)
            if i % 8 == 0:
                print(f"plain marker line {i}", file=sys.stderr, flush=True)
        return True

def driver_logs(k):
    log = get_logger("driver")
    for i in range(N_DRIVER // 2):
        log.info("driver_marker", thread=k, i=i)

t = Talker.remote()
threads = [threading.Thread(target=driver_logs, args=(k,)) for k in range(2)]
for th in threads: th.start()
assert ray.get(t.talk.remote(), timeout=60)
for th in threads: th.join()
assert done.wait(60), seen
ray.shutdown()
"""


def test_actor_and_supervisor_lines_never_share_a_line(tmp_path):
    """A real Ray actor prints JSON events and plain lines while two supervisor threads log:
    every line that carries one of them is exactly one JSON object, and none is lost."""
    import os
    import subprocess
    import sys

    err = tmp_path / "stderr.txt"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with err.open("w") as f:
        proc = subprocess.run([sys.executable, "-c", RAY_SCRIPT], stderr=f, stdout=subprocess.DEVNULL,
                              env=env, timeout=180)
    text = err.read_text()
    assert proc.returncode == 0, text[-3000:]
    events = [json.loads(ln) for ln in text.splitlines() if "marker" in ln]  # one object per line, or it raises
    names = [e["event"] for e in events]
    assert names.count("marker_event") == 300 and names.count("driver_marker") == 600
    plain = [e for e in events if e["event"] == "worker_output"]
    assert len(plain) == 38 and all(e["stream"] == "stderr" and e["actor"] for e in plain)
