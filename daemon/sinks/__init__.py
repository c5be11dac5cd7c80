"""Where results go, one file per output; each satisfies `ResultSink` (base.py).

The worker builds every sink in SINKS whose config section asks for it, and hands each batch
of results to them in this order. The first sink takes each result before the worker counts
it. The results stream comes first, and it runs in a process of its own (results_sender.py),
so what a killed actor sent is counted exactly. A new sink is one module plus one line here.
"""

from __future__ import annotations

from typing import Callable


class SinkError(Exception):
    """A sink failed to store a result (disk full, I/O error). The caller counts and logs it;
    the sink stays usable and retries with a fresh file or socket state on the next result."""

    def __init__(self, sink: str, message: str):
        self.sink = sink
        super().__init__(f"{sink}: {message}")


from .base import ResultSink, SinkContext  # noqa: E402
from .cxi import CxiSink  # noqa: E402  (the sinks import SinkError from here)
from .cxi_file import CxiWriter, write_geometry  # noqa: E402
from .results_stream import ResultStream  # noqa: E402
from .results_sender import ResultSender  # noqa: E402
from .crystfel_live import CrystfelLiveSink  # noqa: E402

SINKS: dict[str, Callable[..., ResultSink | None]] = {
    "results_stream": ResultSender.from_config,
    "cxi": CxiSink.from_config,
    "crystfel": CrystfelLiveSink.from_config,
}

__all__ = ["SINKS", "ResultSink", "SinkContext", "SinkError", "CxiSink", "CxiWriter", "write_geometry",
           "ResultStream", "ResultSender", "CrystfelLiveSink"]
