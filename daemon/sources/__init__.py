"""Frame sources, one file per wire format; `ingest.sockets[].format` picks one by name.

A new format is one module with a class that satisfies `FrameSource` (base.py) plus one line
in SOURCES. Modules are imported on first use, so a format's libraries (cbor2 and
dectris-compression for stream2, bitshuffle for eiger-v1) matter only where it is configured.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .base import ControlEvent, FrameOut, FrameSource, FrameTag, SourceSpec

SOURCES: dict[str, str] = {  # format name -> "module:class" in this package
    "peaknet/1": "peaknet:PeaknetSource",
    "lclstreamer-npz": "lclstreamer:LclstreamerSource",
    "eiger-v1": "eiger_stream_v1:EigerStreamV1Source",
    "stream2": "stream2:Stream2Source",
}


def source_class(name: str) -> Callable[[SourceSpec], FrameSource]:
    """The class of format `name`; KeyError for an unknown name, ImportError when a library
    the format needs is not installed."""
    module, _, cls = SOURCES[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def make_source(spec: SourceSpec) -> FrameSource:
    """The source for `spec.socket.format` (config validation has checked the name)."""
    return source_class(spec.socket.format)(spec)


__all__ = ["SOURCES", "make_source", "source_class", "ControlEvent", "FrameOut", "FrameSource", "FrameTag",
           "SourceSpec"]
