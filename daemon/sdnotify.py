"""systemd notifications (READY, WATCHDOG, STOPPING, STATUS) without the systemd bindings.

The sd_notify protocol is one datagram on the unix socket named by $NOTIFY_SOCKET (a path, or an
abstract socket written with a leading '@'). Outside systemd the variable is unset and every call
is a no-op, so the daemon runs the same under systemd, in a container or in a terminal.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from .log import get_logger

log = get_logger(__name__)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC, as sd_watchdog_enabled advises),
    or None when no watchdog is set for this process."""
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.strip() != str(os.getpid()):
        return None  # meant for another process
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class SdNotifier:
    """Sends sd_notify messages; never raises (a missing listener must not stop the daemon)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self._env = os.environ if env is None else env
        self._addr = self._address(self._env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self.sent = 0
        self.failed = 0

    @staticmethod
    def _address(raw: str) -> str | None:
        if not raw:
            return None
        if raw.startswith("@"):
            return "\0" + raw[1:]
        if raw.startswith("/"):
            return raw
        log.warning("NOTIFY_SOCKET not supported, notifications off", notify_socket=raw)
        return None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, state: str) -> bool:
        """Send raw state lines ("READY=1\\nSTATUS=..."); True when the datagram went out."""
        if self._addr is None:
            return False
        try:
            if self._sock is None:
                # Non-blocking: a listener that stops reading (full datagram queue) must cost a
                # dropped notification, never a daemon stuck in sendto().
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(state.encode(), self._addr)
            self.sent += 1
            return True
        except OSError as exc:
            self.failed += 1
            if self.failed == 1 or self.failed % 100 == 0:
                log.warning("sd_notify failed", error=str(exc), failures=self.failed)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog_interval(self) -> float | None:
        return watchdog_interval(self._env)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
