"""Wire formats the producers speak, one module each; `peaknet-producer --format NAME`.

An encoder turns a run (start, frames, end) into ZMQ messages of its format, so any frame
source (random, bragg, replay) can be sent as `peaknet/1`, or as a detector would send it.
A new format is one module plus one line in ENCODERS.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from .eiger_v1 import COMPRESSIONS as EIGER_V1_COMPRESSIONS, EigerV1Encoder
from .peaknet import PeaknetEncoder
from .stream2 import COMPRESSIONS as STREAM2_COMPRESSIONS, Stream2Encoder


class Encoder(Protocol):
    """One run's messages in one wire format (each a list of ZMQ message parts)."""

    def start(self, source: str, run: int | str, meta: dict[str, Any], first: np.ndarray) -> list:
        """The run's opening message; `first` is the first frame (its shape and dtype)."""

    def frame(self, data: np.ndarray, source: str, seq: int, run: int | str, timestamp_ns: int | None,
              meta: dict[str, Any]) -> list:
        """One frame's message."""

    def end(self, source: str, run: int | str, count: int) -> list:
        """The run's closing message; `count` frames were sent."""


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "peaknet/1": PeaknetEncoder,
    "eiger-v1": EigerV1Encoder,
    "stream2": Stream2Encoder,
}
# Formats that compress, and how (`--compression`); the first is the default.
COMPRESSIONS: dict[str, tuple[str, ...]] = {
    "eiger-v1": EIGER_V1_COMPRESSIONS,
    "stream2": STREAM2_COMPRESSIONS,
}


def make_encoder(name: str, compression: str | None = None) -> Encoder:
    """The encoder of format `name`; ValueError for an unknown format or a compression the
    format does not have (formats without COMPRESSIONS take none)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(ENCODERS)})")
    if compression is None:
        return ENCODERS[name]()
    if compression not in COMPRESSIONS.get(name, ()):
        known = COMPRESSIONS.get(name)
        raise ValueError(f"format {name} has compressions {', '.join(known)}, not {compression!r}" if known
                         else f"format {name} has no compression options (--compression is for "
                              f"{', '.join(COMPRESSIONS)})")
    return ENCODERS[name](compression)


__all__ = ["COMPRESSIONS", "ENCODERS", "Encoder", "make_encoder"]
