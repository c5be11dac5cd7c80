"""sd_notify against a unix datagram socket bound by the test (path and abstract forms)."""

from __future__ import annotations

import os
import socket

import pytest

from peaknet_daemon.sdnotify import SdNotifier, watchdog_interval


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_messages_reach_the_socket(listener):
    path, sock = listener
    n = SdNotifier(env={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving on\n2 GPUs")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 2 GPUs"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("120 frames/s")
    assert sock.recv(4096) == b"STATUS=120 frames/s"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.sent == 4
    n.close()


def test_abstract_socket():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"peaknet-test-{os.getpid()}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = SdNotifier(env={"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_unset_is_a_noop():
    n = SdNotifier(env={})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping() and not n.status("x")
    assert n.sent == 0 and n.failed == 0


def test_missing_listener_does_not_raise(tmp_path):
    n = SdNotifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready()
    assert n.failed == 1


def test_watchdog_interval():
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": pid}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None  # another process
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert SdNotifier(env={"WATCHDOG_USEC": "2000000"}).watchdog_interval() == 1.0


def test_a_listener_that_stops_reading_never_blocks_the_daemon(tmp_path):
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)  # bound, never read: the datagram queue fills up
    notifier = SdNotifier(env={"NOTIFY_SOCKET": path})
    results = [notifier.watchdog() for _ in range(200)]
    assert results[0] is True and results[-1] is False
    assert notifier.failed > 0 and notifier.sent + notifier.failed == 200
    listener.close()
