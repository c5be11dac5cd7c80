"""Where peak lists go: the results stream (ZMQ) and CXI files (HDF5) that CrystFEL reads."""

from __future__ import annotations


class SinkError(Exception):
    """A sink failed to store a result (disk full, I/O error). The caller counts and logs it;
    the sink stays usable and retries with a fresh file or socket state on the next result."""

    def __init__(self, sink: str, message: str):
        self.sink = sink
        super().__init__(f"{sink}: {message}")


from .cxi import CxiWriter, write_geometry  # noqa: E402  (they import SinkError from here)
from .results_stream import ResultStream  # noqa: E402

__all__ = ["SinkError", "CxiWriter", "write_geometry", "ResultStream"]
