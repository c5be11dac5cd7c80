"""Every thread of a worker runs under one wrapper, so none can die unnoticed.

`Supervision.spawn(role, loop)` runs `loop()` on a daemon thread. When it raises, the error is
logged with its traceback and counted by role (`peaknet_thread_failures_total{role}`), the
role's `on_failure` accounts for what the loop held (frames end as `internal_error`), and the
loop is started again, up to `max_restarts` times; after that the role stays dead and the
worker reports itself unhealthy. Loops call `progress(role)` when they get work done, so
`report()` can say for each role whether it is alive and when it last moved. Failures that are
not threads (a dead ingest process) are recorded with `record_failure`.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .log import get_logger

log = get_logger("peaknet.supervision")


@dataclass
class RoleState:
    alive: bool = True
    failures: int = 0
    restarts: int = 0
    last_progress: float = 0.0  # time.monotonic()
    last_error: str = ""


class Supervision:
    """See the module docstring. `owner` names the worker in logs."""

    def __init__(self, owner: str, max_restarts: int = 10):
        self.owner, self.max_restarts = owner, max_restarts
        self.stopping = threading.Event()  # set at stop: failed loops are not restarted then
        self.failures: Counter[str] = Counter()
        self._roles: dict[str, RoleState] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def spawn(self, role: str, loop: Callable[[], None],
              on_failure: Optional[Callable[[BaseException], None]] = None) -> threading.Thread:
        """Run `loop` on a supervised daemon thread named after `role` (unique per worker)."""
        with self._lock:
            self._roles[role] = RoleState(last_progress=time.monotonic())
        thread = threading.Thread(target=self._run, args=(role, loop, on_failure),
                                  name=f"{role}-{self.owner}", daemon=True)
        self._threads[role] = thread
        thread.start()
        return thread

    def _run(self, role: str, loop: Callable[[], None],
             on_failure: Optional[Callable[[BaseException], None]]) -> None:
        state = self._roles[role]
        while True:
            try:
                loop()
                return  # a loop that returns has finished its work (stop)
            except BaseException as exc:
                self._failed(role, exc, traceback.format_exc())
                if on_failure is not None:
                    try:
                        on_failure(exc)
                    except Exception:
                        log.exception("failure_handler_failed", role=role, worker=self.owner)
                with self._lock:
                    if self.stopping.is_set() or state.restarts >= self.max_restarts:
                        state.alive = False
                        log.error("thread_dead", role=role, worker=self.owner, restarts=state.restarts)
                        return
                    state.restarts += 1
                log.warning("thread_restarted", role=role, worker=self.owner, restarts=state.restarts)

    def _failed(self, role: str, exc: BaseException, tb: str) -> None:
        with self._lock:
            self.failures[role] += 1
            state = self._roles.setdefault(role, RoleState())
            state.failures += 1
            state.last_error = repr(exc)[:200]
        log.error("thread_failed", role=role, worker=self.owner, error=repr(exc)[:500], traceback=tb)

    def record_failure(self, role: str, detail: str) -> None:
        """A failure outside a supervised thread (e.g. an ingest process that died)."""
        with self._lock:
            self.failures[role] += 1
            state = self._roles.setdefault(role, RoleState())
            state.failures += 1
            state.last_error = detail[:200]

    def progress(self, role: str) -> None:
        state = self._roles.get(role)
        if state is not None:
            state.last_progress = time.monotonic()

    def dead(self) -> list[str]:
        """Roles whose thread has stopped for good while the worker was not stopping."""
        with self._lock:
            return [r for r, s in self._roles.items() if not s.alive]

    def report(self) -> dict[str, dict]:
        """Per role: alive, failures, restarts, seconds since its last progress."""
        now = time.monotonic()
        with self._lock:
            return {r: {"alive": s.alive and (r not in self._threads or self._threads[r].is_alive()
                                               or self.stopping.is_set()),
                        "failures": s.failures, "restarts": s.restarts,
                        "idle_s": round(now - s.last_progress, 3), "last_error": s.last_error}
                    for r, s in self._roles.items()}

    def join(self, deadline: float, roles: Sequence[str]) -> list[str]:
        """Wait for the threads of `roles` until `deadline` (monotonic); those still running."""
        threads = {r: t for r, t in self._threads.items() if r in roles}
        for thread in threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        return [r for r, t in threads.items() if t.is_alive()]
