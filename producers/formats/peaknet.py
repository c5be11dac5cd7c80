"""`peaknet/1` (README, Protocols): the daemon's own format."""

from __future__ import annotations

from typing import Any

import numpy as np

from peaknet_daemon.wire import encode_control, encode_frame


class PeaknetEncoder:
    """start/end are one msgpack part; a frame is a header part and the raw array, not copied."""

    def start(self, source: str, run: int | str, meta: dict[str, Any], first: np.ndarray,
              count: int | None = None) -> list:
        return encode_control("start", source, run, meta=meta)

    def frame(self, data: np.ndarray, source: str, seq: int, run: int | str, timestamp_ns: int | None,
              meta: dict[str, Any]) -> list:
        return encode_frame(data, source, seq, run, timestamp_ns=timestamp_ns, meta=meta)

    def end(self, source: str, run: int | str, count: int) -> list:
        return encode_control("end", source, run, count=count)
