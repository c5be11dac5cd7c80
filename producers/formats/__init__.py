"""Wire formats the producers speak, one module each; `peaknet-producer --format NAME`.

An encoder turns a run (start, frames, end) into ZMQ messages of its format, so any frame
source (random, bragg, replay) can be sent as `peaknet/1`, or as a detector would send it.
A new format is one module plus one line in ENCODERS.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import numpy as np


class Encoder(Protocol):
    """One run's messages in one wire format (each a list of ZMQ message parts)."""

    def start(self, source: str, run: int | str, meta: dict[str, Any], first: np.ndarray,
              count: int | None = None) -> list:
        """The run's opening message; `first` is the first frame (its shape and dtype), `count`
        the frames the run will have when known (a detector's header announces it)."""

    def frame(self, data: np.ndarray, source: str, seq: int, run: int | str, timestamp_ns: int | None,
              meta: dict[str, Any]) -> list:
        """One frame's message."""

    def end(self, source: str, run: int | str, count: int) -> list:
        """The run's closing message; `count` frames were sent."""


# Format name -> "module:class" in this package, imported on first use (a format's libraries are
# needed only where it is sent).
ENCODERS: dict[str, str] = {
    "peaknet/1": "peaknet:PeaknetEncoder",
    "eiger-v1": "eiger_v1:EigerV1Encoder",
    "stream2": "stream2:Stream2Encoder",
}

# Formats that compress, and how (`--compression`); the first is the default. Each encoder
# module checks its own against this.
COMPRESSIONS: dict[str, tuple[str, ...]] = {
    "eiger-v1": ("bslz4", "lz4", "none"),
    "stream2": ("bslz4", "lz4", "none"),
}


def encoder_class(name: str) -> Callable[..., Encoder]:
    """The encoder class of format `name` (KeyError: unknown; ImportError: a library is missing)."""
    module, _, cls = ENCODERS[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def make_encoder(name: str, compression: str | None = None) -> Encoder:
    """The encoder of format `name`; ValueError for an unknown format or a compression the
    format does not have (formats without COMPRESSIONS take none)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(ENCODERS)})")
    if compression is None:
        return encoder_class(name)()
    if compression not in COMPRESSIONS.get(name, ()):
        known = COMPRESSIONS.get(name)
        raise ValueError(f"format {name} has compressions {', '.join(known)}, not {compression!r}" if known
                         else f"format {name} has no compression options (--compression is for "
                              f"{', '.join(COMPRESSIONS)})")
    return encoder_class(name)(compression)


__all__ = ["COMPRESSIONS", "ENCODERS", "Encoder", "encoder_class", "make_encoder"]
