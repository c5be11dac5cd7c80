"""Frames from files: HDF5 (our recordings, CXI, NXmx), .npy and .npz; lists, globs, loops.

Frame layout by rank: 4 -> (N, P, H, W); 3 -> (N, H, W) single-panel frames, or with
`panels=P` a CXI slab (N, P*H, W) split back into (N, P, H, W); 2 -> one (H, W) frame.
Recordings made by `record` (format peaknet-record/1) replay with each frame's original meta,
source and run, so a replay is bit-identical to what was recorded.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import msgpack
import numpy as np

from peaknet_daemon.wire import dtype_name

from .errors import ProducerError
from .item import Item

H5_SUFFIXES = (".h5", ".hdf5", ".cxi", ".nxs", ".nx5")
H5_DEFAULTS = ("/data", "/entry_1/data_1/data", "/entry/data/data")  # ours, CXI, NXmx
NPZ_DEFAULTS = ("data", "detector_data")
# Per-event metadata that CXI (as LCLS writes it) and NXmx files carry: path -> (key, scale).
H5_META = {
    "/LCLS/photon_energy_eV": ("photon_energy_ev", 1.0),
    "/LCLS/detector_1/EncoderValue": ("detector_distance_mm", 1.0),
    "/entry/instrument/detector/detector_distance": ("detector_distance_mm", 1000.0),
}
HC_EV_ANGSTROM = 12398.4198


def expand(paths: Sequence[str]) -> list[Path]:
    """Files named or matched by globs, in order; a missing file or an empty glob is an error."""
    out: list[Path] = []
    for p in paths:
        if glob.has_magic(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise ProducerError(f"no file matches {p}")
            out.extend(Path(h) for h in hits)
        elif not Path(p).is_file():
            raise ProducerError(f"file not found: {p}")
        else:
            out.append(Path(p))
    if not out:
        raise ProducerError("no input files given")
    return out


@dataclass
class Recorded:
    """Per-frame header fields a recording carries (all None for plain arrays)."""

    meta: dict[str, Any] | None = None
    source: str | None = None
    run: int | str | None = None
    timestamp_ns: int | None = None


def _frames_view(arr: Any, where: str, panels: int | None) -> tuple[int, Any]:
    """Checks rank and dtype; returns the frame count and a function of i giving frame i."""
    try:
        dtype_name(arr.dtype)
    except ValueError:
        raise ProducerError(f"{where}: unsupported dtype {arr.dtype} "
                            "(allowed: uint16, int16, int32, float16, float32)") from None
    if arr.ndim == 4:
        return arr.shape[0], lambda i: np.asarray(arr[i])
    if arr.ndim == 3:
        if panels and panels > 1:
            if arr.shape[1] % panels:
                raise ProducerError(f"{where}: slow axis {arr.shape[1]} is not a multiple of --panels {panels}")
            h = arr.shape[1] // panels
            return arr.shape[0], lambda i: np.asarray(arr[i]).reshape(panels, h, arr.shape[2])
        return arr.shape[0], lambda i: np.asarray(arr[i])[None]
    if arr.ndim == 2:
        return 1, lambda i: np.asarray(arr[()])[None]
    raise ProducerError(f"{where}: dataset of rank {arr.ndim} with shape {tuple(arr.shape)}; "
                        "expected rank 2 (H,W), 3 (N,H,W) or 4 (N,P,H,W)")


def _per_event(values: Any, n: int, i: int) -> float | None:
    arr = np.asarray(values)
    if arr.ndim == 0:
        return float(arr)
    return float(arr[i]) if arr.ndim == 1 and len(arr) == n else None


def _h5_frames(path: Path, dataset: str | None, panels: int | None) -> Iterator[tuple[np.ndarray, Recorded]]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ProducerError(f"cannot open {path} as HDF5: {exc}") from None
    with f:
        names = [dataset] if dataset else [d for d in H5_DEFAULTS if d in f]
        if not names or names[0] not in f or not isinstance(f[names[0]], h5py.Dataset):
            tried = dataset or ", ".join(H5_DEFAULTS)
            raise ProducerError(f"{path}: no dataset {tried}")
        name = names[0]
        n, frame = _frames_view(f[name], f"{path}:{name}", panels)
        headers = f["headers"] if name == "/data" and "headers" in f else None
        extra = {key: (f[p][()], scale) for p, (key, scale) in H5_META.items() if p in f}
        wl = "/entry/instrument/beam/incident_wavelength"
        wavelength = f[wl][()] if wl in f else None
        for i in range(n):
            rec = Recorded()
            if headers is not None:
                h = msgpack.unpackb(headers[i].tobytes(), raw=False)
                rec = Recorded(h.get("meta", {}), h.get("source"), h.get("run"), h.get("timestamp_ns"))
            else:
                meta = {}
                for key, (values, scale) in extra.items():
                    v = _per_event(values, n, i)
                    if v is not None:
                        meta[key] = v * scale
                if wavelength is not None and (v := _per_event(wavelength, n, i)):
                    meta.setdefault("photon_energy_ev", HC_EV_ANGSTROM / v)
                rec.meta = meta
            yield frame(i), rec


def _np_frames(path: Path, dataset: str | None, panels: int | None) -> Iterator[tuple[np.ndarray, Recorded]]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ProducerError(f"cannot read {path}: {exc}") from None
    meta_cols: dict[str, Any] = {}
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = [dataset] if dataset else [k for k in NPZ_DEFAULTS if k in loaded.files]
            if not keys and not dataset:
                keys = [k for k in loaded.files if loaded[k].ndim >= 2][:1]
            if not keys or keys[0] not in loaded.files:
                raise ProducerError(f"{path}: no array {dataset or ' or '.join(NPZ_DEFAULTS)}")
            arr = loaded[keys[0]]
            meta_cols = {k: loaded[k] for k in loaded.files if k != keys[0] and loaded[k].ndim <= 1}
        where = f"{path}:{keys[0]}"
    else:
        arr, where = loaded, str(path)
    n, frame = _frames_view(arr, where, panels)
    for i in range(n):
        meta, ts = {}, None
        for key, values in meta_cols.items():
            v = _per_event(values, n, i)
            if v is None:
                continue
            if key == "timestamp":
                ts = int(v * 1e9)
            elif key == "photon_wavelength" and v > 0:
                meta["photon_energy_ev"] = HC_EV_ANGSTROM / v
            else:
                meta[key] = v
        yield frame(i), Recorded(meta=meta, timestamp_ns=ts)


def file_frames(path: Path, dataset: str | None = None, panels: int | None = None) -> Iterator[tuple[np.ndarray, Recorded]]:
    """The frames of one file with what it recorded about each."""
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        return _h5_frames(path, dataset, panels)
    if suffix in (".npy", ".npz"):
        return _np_frames(path, dataset, panels)
    raise ProducerError(f"{path}: unknown file type {suffix or '(none)'}; use HDF5, .npy or .npz")


def probe(paths: Sequence[Path], dataset: str | None = None,
          panels: int | None = None) -> tuple[str | None, int | str | None]:
    """Opens every file and reads its first frame, so bad input fails before anything is sent;
    returns the source and run recorded with the first frame (None for plain arrays)."""
    identity: tuple[str | None, int | str | None] | None = None
    for path in paths:
        for _, rec in file_frames(path, dataset, panels):
            if identity is None:
                identity = (rec.source, rec.run)
            break
    return identity or (None, None)


def replay_items(paths: Sequence[Path], dataset: str | None = None, panels: int | None = None,
                 loop: bool = False, keep_timestamps: bool = False) -> Iterator[Item]:
    """Frames of all files in order, again and again with `loop`."""
    while True:
        sent = 0
        for path in paths:
            for data, rec in file_frames(path, dataset, panels):
                sent += 1
                yield Item(data, dict(rec.meta or {}), timestamp_ns=rec.timestamp_ns if keep_timestamps else None)
        if not loop or sent == 0:
            return
