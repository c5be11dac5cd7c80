"""Wire formats the producers speak, one module each; `peaknet-producer --format NAME`.

An encoder turns a run (start, frames, end) into ZMQ messages of its format, so any frame
source (random, bragg, replay) can be sent as `peaknet/1`, or as a detector would send it.
A new format is one module plus one line in ENCODERS.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from .eiger_v1 import EigerV1Encoder
from .peaknet import PeaknetEncoder


class Encoder(Protocol):
    """One run's messages in one wire format (each a list of ZMQ message parts)."""

    def start(self, source: str, run: int | str, meta: dict[str, Any], first: np.ndarray) -> list:
        """The run's opening message; `first` is the first frame (its shape and dtype)."""

    def frame(self, data: np.ndarray, source: str, seq: int, run: int | str, timestamp_ns: int | None,
              meta: dict[str, Any]) -> list:
        """One frame's message."""

    def end(self, source: str, run: int | str, count: int) -> list:
        """The run's closing message; `count` frames were sent."""


ENCODERS: dict[str, Callable[[], Encoder]] = {
    "peaknet/1": PeaknetEncoder,
    "eiger-v1": EigerV1Encoder,
}

__all__ = ["ENCODERS", "Encoder"]
