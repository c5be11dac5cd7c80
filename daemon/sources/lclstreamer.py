"""lclstreamer `.npz` batches: one message holds B frames (`detector_data`, `timestamp`,
`photon_wavelength`), as LCLS's lclstreamer sends them. Decompression is bounded."""

from __future__ import annotations

import io
import math
import time
import uuid
import zipfile
from typing import Any, Sequence

import numpy as np

from ..wire import HC_EV_ANGSTROM, INT64_MAX, NPZ_MEMBERS, Header, Rejected, dtype_name, DTYPES
from .base import FrameOut, FrameTag, SourceSpec


class LclstreamerSource:
    """Each accepted batch's frames are numbered and copied into slots; nothing of a bad batch is."""

    def __init__(self, spec: SourceSpec):
        self._npz = NpzDecoder(spec.frame_shape, spec.dtype, spec.socket.max_message_bytes, spec.endpoint)

    def decode(self, parts: Sequence[memoryview], received_at: float, out: FrameOut) -> None:
        if len(parts) != 1:
            raise Rejected("wrong_parts", f"npz message has {len(parts)} parts, expected 1")
        for header, array in self._npz.decode(parts[0]):
            np.copyto(out.slot(), array, casting="no")
            out.commit(FrameTag(header.source, header.seq, header.run, header.timestamp_ns, header.meta,
                                received_at))


class NpzDecoder:
    """lclstreamer `.npz` batches (`detector_data` (B,C,H,W) or (B,H,W), `timestamp`,
    `photon_wavelength`) -> frames, for one ingest socket reader.

    Decompression is bounded: the zip directory's member sizes and each `.npy` header's shape are
    checked against `max_bytes` before anything is inflated. Data whose dtype does not cast
    safely to the configured one (float64 into float32, anything float into an integer type) is
    rejected, never rounded. lclstreamer has no run boundaries: a reader's frames form one run
    `npz` of its own source `<endpoint>#<reader id>`, seq 0, 1, 2, ... in arrival order, so
    two readers never collide; that run is settled when the daemon stops."""

    RUN = "npz"

    def __init__(self, shape: Sequence[int], dtype: str, max_bytes: int, endpoint: str):
        self.shape, self.dtype = tuple(shape), np.dtype(DTYPES[dtype])
        self.max_bytes = int(max_bytes)
        self.source = f"{endpoint}#{uuid.uuid4().hex[:8]}"
        self.seq = 0

    def decode(self, payload: bytes | memoryview) -> list[tuple[Header, np.ndarray]]:
        """All frames of one message (nothing is numbered unless the whole batch is valid).
        Raises Rejected."""
        arrays = self._load(payload)
        data = arrays["detector_data"]
        if data.ndim == 3:
            data = data[:, None]
        if data.ndim != 4 or tuple(data.shape[1:]) != self.shape:
            raise Rejected("wrong_shape", f"detector_data {list(data.shape)} vs frame {list(self.shape)}")
        if not np.can_cast(data.dtype, self.dtype, casting="safe"):
            raise Rejected("wrong_dtype", f"detector_data {data.dtype} does not cast to {self.dtype} without loss")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise Rejected("non_finite", "NaN or Inf in detector_data")
        stamps = np.ravel(arrays.get("timestamp", np.empty(0))).astype(np.float64, copy=False)
        wavelengths = np.ravel(arrays.get("photon_wavelength", np.empty(0))).astype(np.float64, copy=False)
        data = data.astype(self.dtype, copy=False)
        out = []
        for i in range(data.shape[0]):
            meta: dict[str, Any] = {}
            if i < wavelengths.size and math.isfinite(wavelengths[i]) and wavelengths[i] > 0:
                meta["photon_wavelength_a"] = float(wavelengths[i])
                meta["photon_energy_ev"] = HC_EV_ANGSTROM / float(wavelengths[i])
            ts = time.time_ns()
            if i < stamps.size and math.isfinite(stamps[i]) and 0 <= stamps[i] * 1e9 < INT64_MAX:
                ts = int(stamps[i] * 1e9)
            out.append((Header(type="frame", source=self.source, seq=self.seq + i, run=self.RUN,
                               timestamp_ns=ts, shape=self.shape, dtype=dtype_name(self.dtype), meta=meta),
                        data[i]))
        self.seq += len(out)
        return out

    def _load(self, payload: bytes | memoryview) -> dict[str, np.ndarray]:
        """The known members, each read only after its sizes passed the checks."""
        arrays: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(io.BytesIO(payload)) as zf:
                members = {info.filename: info for info in zf.infolist()}
                declared = sum(info.file_size for info in members.values())
                if declared > self.max_bytes:
                    raise Rejected("oversize", f"npz expands to {declared} bytes > {self.max_bytes}")
                for name in NPZ_MEMBERS:
                    info = members.get(name + ".npy")
                    if info is not None:
                        with zf.open(info) as f:
                            arrays[name] = _read_npy(f, info.file_size)
        except Rejected:
            raise
        except Exception as exc:  # zipfile, zlib and numpy's header parser raise many types
            raise Rejected("bad_npz", f"{type(exc).__name__}: {exc}"[:80]) from None
        if "detector_data" not in arrays:
            raise Rejected("bad_npz", "no detector_data member")
        return arrays


def _read_npy(f: Any, member_bytes: int) -> np.ndarray:
    """One `.npy` member whose header must agree with the member's size in the zip directory
    (a small member claiming a huge shape would otherwise allocate that shape)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise Rejected("bad_npz", f"member dtype {dtype} is not a plain number type")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > member_bytes:
        raise Rejected("bad_npz", f"header claims {nbytes} bytes, the member holds {member_bytes}")
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise Rejected("bad_npz", f"member truncated: {len(raw)} of {nbytes} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
