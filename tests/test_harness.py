"""The test harness reads the daemon's stderr as the tests see it (tests/harness.py)."""

from harness import events_in, free_port  # puts tools/ on the path
from daemon_process import ephemeral_start  # noqa: E402


def test_a_supervisor_line_printed_inside_an_actors_line_gives_both_events():
    actor = '\x1b[36m(PipelineActor pid=17081)\x1b[0m {"event": "worker_stopped", "counts": {"a": 1}}'
    joined = actor + '{"event": "daemon_stopped", "frames_received": 300}\n'  # as seen in CI
    assert [e["event"] for e in events_in(joined)] == ["worker_stopped", "daemon_stopped"]
    assert events_in("2026-12-03 INFO worker.py -- Connected to Ray cluster.\n") == []


def test_free_ports_lie_outside_the_kernels_ephemeral_range():
    assert all(20000 <= free_port() < min(ephemeral_start(), 32768) for _ in range(50))
