"""`peaknet/1`: a msgpack header part and, for frames, one payload part (README, Protocols)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..wire import Rejected, check_frame, decode_header
from .base import ControlEvent, FrameOut, FrameTag, SourceSpec


class PeaknetSource:
    """Frames are checked against the configured shape and dtype and copied once into the slot."""

    def __init__(self, spec: SourceSpec):
        self.shape, self.dtype = tuple(spec.frame_shape), spec.dtype

    def decode(self, parts: Sequence[memoryview], received_at: float, out: FrameOut) -> None:
        header = decode_header(parts[0])
        if header.type != "frame":
            if len(parts) != 1:
                raise Rejected("wrong_parts", f"{header.type} has {len(parts)} parts, expected 1")
            out.control(ControlEvent(header.type, header.source, header.run, header.count))
            return
        if len(parts) != 2:
            raise Rejected("wrong_parts", f"frame has {len(parts)} parts, expected 2")
        array = check_frame(header, parts[1], self.shape, self.dtype)
        np.copyto(out.slot(), array, casting="no")
        out.commit(FrameTag(header.source, header.seq, header.run, header.timestamp_ns, header.meta, received_at))
