"""Batch assembly: frames from several ingest threads go into one pinned slot at a time.

An ingest thread claims the next index of the open slot under a lock, then copies its payload
into that index without the lock, so several sockets fill one batch in parallel. A batch is
submitted when it is full or `max_batch_delay_ms` after its first frame, and only once every
claimed index has been filled: the thread that completes it submits it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class SlotSource(Protocol):
    """The part of `Pipeline` the assembler uses."""

    batch_size: int

    def acquire(self, timeout: float | None = None) -> Any: ...
    def submit(self, slot: Any, n: int, tags: list) -> None: ...


@dataclass
class _OpenBatch:
    slot: Any
    tags: list
    opened_at: float
    claimed: int = 0
    filled: int = 0
    closed: bool = False  # no more claims; submit when filled == claimed


class BatchAssembler:
    """Fills pipeline slots from concurrent producers of frames; see the module docstring."""

    def __init__(self, pipeline: SlotSource, max_delay_s: float, give_up: threading.Event):
        self._pipeline = pipeline
        self._max_delay_s = max_delay_s
        self._give_up = give_up  # set only when slots can no longer free up
        self._lock = threading.Lock()
        self._open: _OpenBatch | None = None
        self.batches_submitted = 0

    def put(self, frame: np.ndarray, tag: Any) -> bool:
        """Copy one frame into the open batch. False only after `give_up` was set with no free slot."""
        with self._lock:
            batch = self._open
            if batch is None:
                slot = self._acquire()
                if slot is None:
                    return False
                batch = self._open = _OpenBatch(slot, [None] * self._pipeline.batch_size, time.monotonic())
            index = batch.claimed
            batch.claimed += 1
            if batch.claimed == self._pipeline.batch_size:
                batch.closed, self._open = True, None
        np.copyto(batch.slot.frames[index], frame, casting="no")
        with self._lock:
            batch.tags[index] = tag
            batch.filled += 1
            self._submit_if_done(batch)
        return True

    def flush_due(self, now: float | None = None) -> None:
        """Close the open batch when its delay has passed (called by a timer thread)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            batch = self._open
            if batch is not None and batch.claimed and now - batch.opened_at >= self._max_delay_s:
                batch.closed, self._open = True, None
                self._submit_if_done(batch)

    def flush(self) -> None:
        """Close the open batch now (shutdown)."""
        self.flush_due(now=float("inf"))

    def _acquire(self) -> Any:
        while True:
            slot = self._pipeline.acquire(timeout=0.1)
            if slot is not None or self._give_up.is_set():
                return slot

    def _submit_if_done(self, batch: _OpenBatch) -> None:
        if batch.closed and batch.filled == batch.claimed and batch.claimed:
            self._pipeline.submit(batch.slot, batch.claimed, batch.tags[: batch.claimed])
            self.batches_submitted += 1
