"""The source interface: what an ingest process asks of a wire format.

An ingest process owns the sockets and the batch slots; a `FrameSource` owns only the format.
For each received message it writes the frames it decodes into slot positions handed out by a
`FrameOut`, reports run boundaries, or raises `Rejected(reason)`. Every message thus ends in
frames, a control event or one counted rejection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


@dataclass
class FrameTag:
    """What travels with a frame through the pipeline and comes back with its peaks."""

    source: str
    seq: int
    run: int | str
    timestamp_ns: int
    meta: dict[str, Any] = field(default_factory=dict)
    received_at: float = 0.0  # time.perf_counter() at receive


@dataclass(frozen=True)
class ControlEvent:
    """A run started or ended; `count` (end only) is the number of frames the source sent."""

    type: str  # "start" | "end"
    source: str
    run: int | str
    count: int = 0


@dataclass(frozen=True)
class SourceSpec:
    """What a source is built from: its socket's config and the frame layout the daemon runs."""

    socket: Any  # config.SocketConfig
    endpoint: str
    frame_shape: tuple[int, ...]  # (panels, H, W)
    dtype: str  # the pipeline's dtype name (wire.DTYPES)


class FrameOut(Protocol):
    """Where a source puts what it decoded (the ingest process's batch filler)."""

    def slot(self) -> np.ndarray:
        """A writable (panels, H, W) array in the pipeline's dtype: the next frame goes here."""

    def commit(self, tag: FrameTag) -> None:
        """The frame written into the last `slot()` is complete."""

    def control(self, event: ControlEvent) -> None:
        """A run started or ended."""


class FrameSource(Protocol):
    """One wire format: received message parts -> frames, control events or a rejection."""

    def decode(self, parts: Sequence[memoryview], received_at: float, out: FrameOut) -> None:
        """Decode one message into `out`; raise `wire.Rejected(reason, detail)` when it is bad."""
