"""Frame sources, one file per wire format; `ingest.sockets[].format` picks one by name.

A new format is one module with a class that satisfies `FrameSource` (base.py) plus one line
in SOURCES.
"""

from __future__ import annotations

from typing import Callable

from .base import ControlEvent, FrameOut, FrameSource, FrameTag, SourceSpec
from .eiger_stream_v1 import EigerStreamV1Source
from .lclstreamer import LclstreamerSource
from .peaknet import PeaknetSource
from .stream2 import Stream2Source

SOURCES: dict[str, Callable[[SourceSpec], FrameSource]] = {
    "peaknet/1": PeaknetSource,
    "lclstreamer-npz": LclstreamerSource,
    "eiger-v1": EigerStreamV1Source,
    "stream2": Stream2Source,
}


def make_source(spec: SourceSpec) -> FrameSource:
    """The source for `spec.socket.format` (config validation has checked the name)."""
    return SOURCES[spec.socket.format](spec)


__all__ = ["SOURCES", "make_source", "ControlEvent", "FrameOut", "FrameSource", "FrameTag", "SourceSpec"]
