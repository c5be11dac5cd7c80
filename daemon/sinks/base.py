"""The sink interface: what the result thread asks of an output.

The worker builds each configured sink once, hands it every frame's result (a
`peaknet-result/1` map) in order, and the frame's data when the sink asked for it. A sink must
not raise for a single bad result or a slow consumer: it counts (`dropped`) and goes on;
`SinkError` is for a failure of the output itself (disk full, socket gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np


@dataclass(frozen=True)
class SinkContext:
    """What a sink gets from the worker besides the config."""

    worker: str  # the worker's name, e.g. "w0"
    index: int  # the actor's index (bind-mode sinks bind base port + index)
    prefix: str  # unique per worker incarnation, for file names
    zmq_context: Any  # zmq.Context shared by the worker's sockets
    secure: Callable[[Any], None] | None  # applies CURVE options to a socket (security.SocketGuard)
    spawn: Callable[..., Any] | None  # supervision.Supervision.spawn, for a sink's own thread
    on_error: Callable[[str, BaseException], None]  # count and log a failure of sink `name`
    sent_tally: str | None = None  # where the results sender writes what it sent (supervisor reads it)


class ResultSink(Protocol):
    """An output for per-frame results: a stream, files, a live hand-off."""

    def wants_frame(self, n_peaks: int) -> bool:
        """Whether `put` needs the data of a frame with `n_peaks` peaks (copied out of its slot)."""

    def put(self, result: dict, frame: np.ndarray | None) -> None:
        """Take one frame's result, and its (panels, H, W) data when `wants_frame` said so."""

    def close_run(self, run: Any, timeout: float) -> list[str]:
        """Flush and finish `run` (its files); the paths completed."""

    def close(self, timeout: float) -> bool:
        """Flush and close everything; False when that did not finish within `timeout`."""
