"""Plain random frames: the simple producer, for load and plumbing tests.

A small pool of frames is drawn once per seed and cycled, so generation does not limit the send
rate (drawing an 8 MB frame costs more than sending it over ipc).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from peaknet_daemon.wire import DTYPES, dtype_name

from .item import Item

POOL_BYTES = 256 * 1024 * 1024


def random_pool(shape: Sequence[int], dtype: str, seed: int = 0, pool: int = 8) -> list[np.ndarray]:
    """`pool` random frames (fewer when they would exceed 256 MB): standard normal for float
    dtypes, integers in [0, 1000) for integer dtypes."""
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be positive, got {shape}")
    dt = np.dtype(DTYPES[dtype_name(np.dtype(dtype))])
    per_frame = int(np.prod(shape)) * dt.itemsize
    n = max(1, min(pool, POOL_BYTES // max(per_frame, 1)))
    rng = np.random.default_rng([int(seed), 7])
    if dt.kind == "f":
        return [rng.standard_normal(shape, dtype=np.float32).astype(dt) for _ in range(n)]
    return [rng.integers(0, 1000, size=shape).astype(dt) for _ in range(n)]


def random_items(shape: Sequence[int], dtype: str, seed: int = 0, pool: int = 8) -> Iterator[Item]:
    """An endless stream cycling through the pool."""
    frames = random_pool(shape, dtype, seed, pool)
    i = 0
    while True:
        yield Item(frames[i % len(frames)])
        i += 1
