"""Batch slots and ingest counters in shared memory, written by ingest processes, read by the
GPU process.

One POSIX shared-memory block holds `n` batch slots of (batch, P, H, W) frames. The GPU process
creates it, registers it with CUDA as pinned memory (`cudaHostRegister`), so the H2D copy of a
slot runs at pinned speed and asynchronously, and unlinks it on close. Ingest processes attach
by name and copy each payload once, straight into a slot. A second, small block holds one row
of counters per ingest process; a row outlives its process, which is how the GPU process knows
exactly what a killed ingest process had taken off its sockets. After the rows comes one gauge
the GPU process writes: the batches it has on the device (`in_flight`). An ingest process reads
it to decide whether a partial batch should go now (see ingest_process.py).

Frames never go through pickling or Ray's object store: only slot indices and frame tags cross
between processes.
"""

from __future__ import annotations

import math
import os
import uuid
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np

from .wire import DTYPES, REASONS

# Counter columns of an ingest process's row (int64). Rejections follow, one column per reason.
# SLOT_WAIT_NS: time the process had no free slot to fill (both of its slots with the GPU process).
FRAMES, CONTROLS, HEARTBEAT_NS, AUTH_FAILURES, DISCONNECTS, SLOT_WAIT_NS = range(6)
INGEST_REASONS = (*REASONS, "shutdown")
REJECTED0 = 6
COLUMNS = REJECTED0 + len(INGEST_REASONS)


class SharedRing:
    """`slots` batch buffers plus `rows` counter rows in shared memory (see module docstring)."""

    def __init__(self, name: str, slots: int, batch: int, frame_shape: Sequence[int], dtype: str,
                 rows: int, create: bool):
        self.name, self.n_slots, self.batch = name, slots, batch
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.dtype = dtype
        self.rows = rows
        np_dtype = np.dtype(DTYPES[dtype])
        self.slot_shape = (batch, *self.frame_shape)
        self.slot_bytes = int(math.prod(self.slot_shape)) * np_dtype.itemsize
        page = 4096
        self._stride = -(-self.slot_bytes // page) * page  # each slot page-aligned
        size = max(self._stride * slots, page)
        counters_size = (rows * COLUMNS + 1) * 8  # the rows, then the in-flight gauge
        if create:
            self._data = shared_memory.SharedMemory(name=name, create=True, size=size)
            self._counts = shared_memory.SharedMemory(name=name + "-c", create=True, size=counters_size)
        else:
            # Ingest processes are spawned by the creator and share its resource tracker, which
            # unlinks the block if the creator dies without doing so.
            self._data = shared_memory.SharedMemory(name=name)
            self._counts = shared_memory.SharedMemory(name=name + "-c")
        self.owner = create
        self.nbytes = size
        self.slots: list[np.ndarray] = [
            np.ndarray(self.slot_shape, dtype=np_dtype, buffer=self._data.buf, offset=i * self._stride)
            for i in range(slots)]
        self.counters = np.ndarray((rows, COLUMNS), dtype=np.int64, buffer=self._counts.buf)
        # batches submitted to the device and not yet collected (written by the GPU process only)
        self.in_flight = np.ndarray((1,), dtype=np.int64, buffer=self._counts.buf, offset=rows * COLUMNS * 8)
        if create:
            self.counters[:] = 0
            self.in_flight[:] = 0
        self._pinned_ptr: int | None = None

    @classmethod
    def create(cls, slots: int, batch: int, frame_shape: Sequence[int], dtype: str, rows: int) -> "SharedRing":
        name = f"peaknet-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return cls(name, slots, batch, frame_shape, dtype, rows, create=True)

    def attach_args(self) -> tuple:
        """What an ingest process needs to attach: `SharedRing(*args, create=False)`."""
        return (self.name, self.n_slots, self.batch, self.frame_shape, self.dtype, self.rows)

    def pin(self) -> bool:
        """Register the slots with CUDA as page-locked memory; False when CUDA is absent or
        refuses (then copies still work, at pageable speed)."""
        import torch
        if not torch.cuda.is_available() or self._pinned_ptr is not None:
            return self._pinned_ptr is not None
        ptr = self.slots[0].ctypes.data if self.slots else 0
        err = torch.cuda.cudart().cudaHostRegister(ptr, self._stride * self.n_slots, 0)
        ok = int(err) == 0 if not hasattr(err, "value") else err.value == 0
        if ok:
            self._pinned_ptr = ptr
        return ok

    def close(self) -> None:
        """Unregister, release the views, and unlink when this process created the block."""
        if self._pinned_ptr is not None:
            import torch
            torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr)
            self._pinned_ptr = None
        self.slots, self.counters = [], np.zeros((0, COLUMNS), dtype=np.int64)
        self.in_flight = np.zeros(1, dtype=np.int64)
        for shm in (self._data, self._counts):
            try:
                shm.close()
            except BufferError:  # a view is still referenced somewhere: the unlink still frees the name
                pass
            if self.owner:
                try:
                    shm.unlink()
                except FileNotFoundError:
                    pass
