"""CXI files of peak lists (and frames) in the layout Cheetah and psocake write, for CrystFEL.

A `(P, H, W)` frame is stored as the `(P*H, W)` slab; a peak at (panel, y, x) has
`peakYPosRaw = panel*H + y`, `peakXPosRaw = x`. Every dataset's first axis is the file's events.
Files are written as `NAME.cxi.tmp` and renamed on close, so a reader that globs `*.cxi` never
sees a half-written file. An event's values are checked before anything is buffered (a bad
event raises ValueError and the file stays intact); any error after that (disk full, a bug)
raises `SinkError` and leaves the file as `NAME.cxi.partial`, never as a `.cxi` with wrong
content; the next `write` starts a new one, so the writer never crash-loops the actor.
A row holds at most `max_peaks` peaks: a frame with more keeps its strongest (by intensity),
and the peaks left out are counted in `peaks_truncated`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..log import get_logger
from . import SinkError

log = get_logger(__name__)

RESULT = "/entry_1/result_1"
DATA = "/entry_1/data_1/data"
PHOTON_ENERGY = "/LCLS/photon_energy_eV"
DETECTOR_DISTANCE = "/LCLS/detector_1/EncoderValue"  # mm, as LCLS files hold it
MAX_PEAKS_CAP = 2048  # columns of the peak tables (CrystFEL reads any width; files stay small)
INT64_MAX = 2**63 - 1
GEOMETRY_LINK = "peaknet-slab.geom"  # points at the geometry of the latest frame layout
_PEAK_COLUMNS = (  # dataset, results column, dtype
    ("peakXPosRaw", "x", np.float32),
    ("peakYPosRaw", None, np.float32),  # panel*H + y
    ("peakTotalIntensity", "intensity", np.float32),
    ("peakSegPosRaw", "panel", np.int32),
    ("peakNPixels", "npix", np.int32),
)
_STR = h5py.string_dtype("utf-8")
_EVENT_DATASETS = (  # per-event scalars: path, dtype
    (f"{RESULT}/nPeaks", np.int32),
    ("/entry_1/timestamp_ns", np.int64),
    ("/entry_1/seq", np.int64),
    ("/entry_1/source", _STR),
    ("/entry_1/run", _STR),
    (PHOTON_ENERGY, np.float64),
    (DETECTOR_DISTANCE, np.float64),
    ("/LCLS/machineTime", np.int64),
    ("/LCLS/machineTimeNanoSeconds", np.int64),
)


def default_max_peaks(max_peaks_per_panel: int, panels: int) -> int:
    """Columns of the peak tables: every panel's peaks, capped to keep files small."""
    return max(1, min(max_peaks_per_panel * panels, MAX_PEAKS_CAP))


class CxiWriter:
    """Appends one event per result to rotating CXI files. Not thread-safe: one result thread.

    `compression` applies to the frames: gzip (deflate, level 1, shuffled: any HDF5 reader,
    CrystFEL included), lzf (h5py's own filter: CrystFEL cannot read it) or none. Cost measured
    on the 2-core dev VM per epix10k2M frame: ~18 ms none, ~70 ms lzf, ~90 ms gzip; peak rows
    alone ~0.3 ms. An I/O error loses the rows not yet flushed (at most `grow_by` events)."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, frame_shape: Sequence[int], dtype: Any,
                 max_peaks: int, frames_per_file: int, save_frames: str = "hits", hit_threshold: int = 10,
                 compression: str = "gzip", grow_by: int = 64, geometry: bool = True,
                 geometry_file: str | None = None):
        if save_frames not in ("hits", "all", "none"):
            raise ValueError(f"save_frames must be hits, all or none, got {save_frames!r}")
        if len(frame_shape) != 3:
            raise ValueError(f"frame_shape must be (panels, H, W), got {frame_shape!r}")
        if compression not in ("gzip", "lzf", "none"):
            raise ValueError(f"compression must be gzip, lzf or none, got {compression!r}")
        self.out_dir = Path(out_dir)
        self.prefix = _safe(prefix)
        self.frame_shape = tuple(int(n) for n in frame_shape)
        self.dtype = np.dtype(dtype)
        self.max_peaks = int(max_peaks)
        self.frames_per_file = int(frames_per_file)
        self.save_frames, self.hit_threshold = save_frames, int(hit_threshold)
        self.compression, self.grow_by = compression, max(1, int(grow_by))
        self._want_geometry = geometry
        self._geometry_file = geometry_file  # the name each file's `geometry_file` attribute gives
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._run: str | None = None
        self._events = 0
        self._block: _Block | None = None
        self._index: dict[str, int] = {}  # run -> next file number
        self._files: list[Path] = []
        self.events_written = 0
        self.peaks_truncated = 0
        self.geometry_path: Path | None = None

    def truncation(self, n_peaks: int) -> int:
        """Peaks a frame with `n_peaks` loses in its CXI row (the weakest ones)."""
        return max(0, int(n_peaks) - self.max_peaks)

    # ------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------

    def write(self, result: dict[str, Any], frame: np.ndarray | None = None,
              meta: dict[str, Any] | None = None) -> bool:
        """Append one event; False when save_frames='hits' and the frame is no hit. A hit is
        result['hit'] when present, else n_peaks >= hit_threshold. `meta` (or result['meta'])
        gives photon_energy_ev and detector_distance_mm. Raises SinkError on I/O errors."""
        peaks = result.get("peaks") or {}
        n_found = len(peaks.get("x", ()))
        hit = bool(result["hit"]) if "hit" in result else n_found >= self.hit_threshold
        if self.save_frames == "hits" and not hit:
            return False
        slab = None
        if self.save_frames != "none":
            if frame is None:
                raise ValueError("save_frames is not 'none': write() needs the frame")
            frame = np.asarray(frame)
            if frame.shape != self.frame_shape:
                raise ValueError(f"frame shape {frame.shape} != configured {self.frame_shape}")
            p, h, w = self.frame_shape
            slab = frame.reshape(p * h, w)
        run = str(result.get("run", 0))
        meta = {**(result.get("meta") or {}), **(meta or {})}
        row, columns = self._event_row(result, meta), self._peak_columns(peaks, n_found)
        try:
            if self._file is not None and run != self._run:
                self._finish()  # one run per file
            if self._file is None:
                self._open(run)
            self._append(row, columns, slab)
            self.peaks_truncated += n_found - len(columns["peakXPosRaw"])
            if self._events >= self.frames_per_file:
                self._finish()
        except Exception as exc:  # whatever broke, the file must not pass for a complete one
            self._abandon()
            raise SinkError("cxi", f"{type(exc).__name__}: {exc}") from exc
        return True

    def _event_row(self, result: dict, meta: dict) -> dict[str, Any]:
        """The per-event scalars, checked (ValueError) before anything is buffered."""
        def integer(name: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= INT64_MAX:
                raise ValueError(f"{name} {value!r} is not an int64 >= 0")
            return int(value)

        def positive(name: str) -> float:
            value = meta.get(name)
            if value is None:
                return math.nan
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"meta {name} {value!r} is not a finite number > 0")
            return float(value)

        ts = integer("timestamp_ns", result.get("timestamp_ns", 0))
        return {
            "/entry_1/timestamp_ns": ts, "/entry_1/seq": integer("seq", result.get("seq", 0)),
            "/entry_1/source": str(result.get("source", "")), "/entry_1/run": str(result.get("run", 0)),
            PHOTON_ENERGY: positive("photon_energy_ev"), DETECTOR_DISTANCE: positive("detector_distance_mm"),
            "/LCLS/machineTime": ts // 10**9, "/LCLS/machineTimeNanoSeconds": ts % 10**9,
        }

    def _peak_columns(self, peaks: dict, n_found: int) -> dict[str, np.ndarray]:
        """The row's peak columns: all peaks, or the `max_peaks` strongest in their original
        (panel) order. Raises ValueError for columns of unequal length or non-numbers."""
        cols = {}
        for key in ("panel", "y", "x", "intensity", "npix"):
            values = np.asarray(peaks.get(key, np.zeros(n_found)), dtype=np.float64)
            if values.shape != (n_found,):
                raise ValueError(f"peak column {key} has shape {values.shape}, expected ({n_found},)")
            cols[key] = values
        keep = slice(None)
        if n_found > self.max_peaks:
            keep = np.sort(np.argsort(-cols["intensity"], kind="stable")[: self.max_peaks])
        h = self.frame_shape[1]
        out = {"peakYPosRaw": cols["panel"][keep] * h + cols["y"][keep]}
        for name, col, _dt in _PEAK_COLUMNS:
            if col is not None:
                out[name] = cols[col][keep]
        return out

    def run_end(self, run: int | str | None = None) -> None:
        """Close the current file if it belongs to `run` (any run when None), so the run's files
        are complete and renamed."""
        if self._file is not None and (run is None or str(run) == self._run):
            self._close_or_raise()

    def close(self) -> None:
        """Finish the current file (idempotent)."""
        if self._file is not None:
            self._close_or_raise()

    def files(self) -> list[Path]:
        """Completed files, oldest first."""
        return list(self._files)

    def __enter__(self) -> "CxiWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------

    def _open(self, run: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self._want_geometry and self.geometry_path is None:
            self.geometry_path = ensure_geometry(self.out_dir, self.frame_shape)
        n = self._index.get(run, 0)
        while True:
            final = self.out_dir / f"{self.prefix}-r{_safe(run)}-{n:04d}.cxi"
            if not final.exists() and not final.with_name(final.name + ".tmp").exists():
                break
            n += 1  # never overwrite (e.g. a restarted actor reusing its prefix)
        self._index[run] = n + 1
        tmp = final.with_name(final.name + ".tmp")
        f = h5py.File(tmp, "w")
        self._file, self._tmp, self._final, self._run, self._events = f, tmp, final, run, 0
        self._block = None
        f.create_dataset("cxi_version", data=150)
        rows = self.grow_by
        for path, dt in _EVENT_DATASETS:
            f.create_dataset(path, shape=(0,), maxshape=(None,), dtype=dt, chunks=(rows,))
        for name, _col, dt in _PEAK_COLUMNS:
            f.create_dataset(f"{RESULT}/{name}", shape=(0, self.max_peaks), maxshape=(None, self.max_peaks),
                             dtype=dt, chunks=(rows, self.max_peaks), fillvalue=0,
                             compression="gzip", compression_opts=1)
        if self.save_frames != "none":
            p, h, w = self.frame_shape
            opts: dict[str, Any] = {}
            if self.compression == "gzip":
                opts = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
            elif self.compression == "lzf":
                opts = {"compression": "lzf", "shuffle": True}
            f.create_dataset(DATA, shape=(0, p * h, w), maxshape=(None, p * h, w), dtype=self.dtype,
                             chunks=(1, p * h, w), **opts)
            f["/entry_1/instrument_1/detector_1/data"] = h5py.SoftLink(DATA)
        f.attrs["creator"] = "peaknet-daemon"
        f.attrs["frame_shape"] = list(self.frame_shape)
        f.attrs["geometry_file"] = self._geometry_file or geometry_name(self.frame_shape)

    def _append(self, row: dict[str, Any], columns: dict[str, np.ndarray], slab: np.ndarray | None) -> None:
        """Frames go straight to the file; peak rows and scalars fill an in-memory block that is
        written a whole chunk at a time (row-by-row writes into compressed chunks cost ~7 ms)."""
        f = self._file
        assert f is not None
        i = self._events
        if slab is not None:
            ds = f[DATA]
            if i >= ds.shape[0]:
                ds.resize(i + self.grow_by, axis=0)
            ds[i] = slab
        block = self._block
        if block is None:
            block = self._block = _Block(self.grow_by, self.max_peaks)
        j = block.n
        n = len(columns["peakXPosRaw"])
        for name, values in columns.items():
            block.peaks[name][j, :n] = values
        for path, value in {**row, f"{RESULT}/nPeaks": n, "/entry_1/run": self._run}.items():
            block.scalars[path].append(value)
        block.n = j + 1
        self._events = i + 1
        self.events_written += 1
        if block.n == self.grow_by:
            self._flush()

    def _flush(self) -> None:
        """Write the pending block of rows at [events - n, events)."""
        f, block = self._file, self._block
        if f is None or block is None or block.n == 0:
            return
        self._block = None
        start, stop = self._events - block.n, self._events
        for path, dt in _EVENT_DATASETS:
            ds = f[path]
            ds.resize(stop, axis=0)
            ds[start:stop] = np.asarray(block.scalars[path], dtype=object if dt is _STR else dt)
        for name, _col, _dt in _PEAK_COLUMNS:
            ds = f[f"{RESULT}/{name}"]
            ds.resize(stop, axis=0)
            ds[start:stop] = block.peaks[name][:block.n]

    def _finish(self) -> None:
        """Flush, trim to the events written, close and rename .tmp -> .cxi."""
        f, tmp, final = self._file, self._tmp, self._final
        assert f is not None and tmp is not None and final is not None
        self._flush()
        if self.save_frames != "none":
            f[DATA].resize(self._events, axis=0)
        f.close()
        self._file = None
        os.replace(tmp, final)
        self._files.append(final)
        log.info("cxi file complete", path=str(final), events=self._events)

    def _close_or_raise(self) -> None:
        try:
            self._finish()
        except Exception as exc:
            self._abandon()
            raise SinkError("cxi", f"{type(exc).__name__}: {exc}") from exc

    def _abandon(self) -> None:
        """After an I/O error: drop the handle and keep what the file holds as NAME.cxi.partial
        (not *.cxi, so CrystFEL file lists skip it); the next write opens a new file."""
        f, tmp, self._file, self._block = self._file, self._tmp, None, None
        if f is not None:
            try:
                f.close()
            except Exception:
                pass
        if tmp is not None and tmp.exists():
            try:
                os.replace(tmp, tmp.with_suffix(".partial"))
            except OSError:
                pass
        log.warning("cxi file abandoned after an error", path=str(tmp.with_suffix(".partial")) if tmp else None)


class _Block:
    """Rows not yet written: peak tables (zero-padded) and per-event scalars."""

    def __init__(self, rows: int, max_peaks: int):
        self.n = 0
        self.peaks = {name: np.zeros((rows, max_peaks), dt) for name, _col, dt in _PEAK_COLUMNS}
        self.scalars: dict[str, list] = {path: [] for path, _dt in _EVENT_DATASETS}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)) or "_"


def _grid(panels: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(panels))
    return math.ceil(panels / cols), cols


def geometry_name(frame_shape: Sequence[int]) -> str:
    """One geometry file per frame layout: `peaknet-slab-16x352x384.geom`."""
    return "peaknet-slab-" + "x".join(str(int(n)) for n in frame_shape) + ".geom"


def geometry_matches(path: str | os.PathLike, frame_shape: Sequence[int]) -> bool:
    """Whether a geometry file's panels are exactly the slab of `frame_shape` (the panel
    corners, which a user replaces with the detector's metrology, are not compared)."""
    p, h, w = (int(n) for n in frame_shape)
    expected = {}
    for i in range(p):
        expected.update({f"p{i}/min_fs": 0, f"p{i}/max_fs": w - 1, f"p{i}/min_ss": i * h,
                         f"p{i}/max_ss": (i + 1) * h - 1})
    found = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, eq, value = line.split(";")[0].partition("=")
            key = key.strip()
            if eq and key.split("/")[-1] in ("min_fs", "max_fs", "min_ss", "max_ss"):
                found[key] = int(value.strip())
    except (OSError, ValueError):
        return False
    return found == expected


def ensure_geometry(out_dir: str | os.PathLike, frame_shape: Sequence[int]) -> Path:
    """At run start: the layout's geometry file exists and matches the frames (a mismatching one
    is kept as `*.geom.stale` and rewritten), and `peaknet-slab.geom` points at it."""
    out_dir = Path(out_dir)
    path = out_dir / geometry_name(frame_shape)
    if path.exists() and not geometry_matches(path, frame_shape):
        os.replace(path, path.with_name(path.name + ".stale"))
        log.warning("cxi geometry file did not match the frames: rewritten", path=str(path),
                    frame_shape=list(frame_shape), kept_as=path.name + ".stale")
    if not path.exists():
        write_geometry(path, frame_shape)
    link = out_dir / GEOMETRY_LINK
    if not (link.is_symlink() and os.readlink(link) == path.name):
        tmp = link.with_name(f"{link.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(path.name, tmp)
        os.replace(tmp, link)
    return path


def write_geometry(path: str | os.PathLike, frame_shape: Sequence[int], pixel_size_m: float = 100e-6,
                   adu_per_eV: float = 1.0 / 9500.0, coffset_m: float = 0.0, gap_px: int = 10) -> Path:
    """A CrystFEL geometry file for the slab layout (written atomically; returns its path)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(slab_geometry_text(frame_shape, pixel_size_m, adu_per_eV, coffset_m, gap_px))
    os.replace(tmp, path)
    return path


def slab_geometry_text(frame_shape: Sequence[int], pixel_size_m: float = 100e-6, adu_per_eV: float = 1.0 / 9500.0,
                       coffset_m: float = 0.0, gap_px: int = 10) -> str:
    """The slab layout's CrystFEL geometry, for the CXI files.

    Panel positions are a placeholder grid centred on the beam (the real detector metrology is
    not in the frames); replace the corner/fs/ss lines with the detector's geometry. Defaults suit
    the epix10k2M: 100 um pixels (res = 10000 px/m) and one ADU per photon at 9.5 keV."""
    p, h, w = (int(n) for n in frame_shape)
    rows, cols = _grid(p)
    width, height = cols * w + (cols - 1) * gap_px, rows * h + (rows - 1) * gap_px
    lines = [
        "; CrystFEL geometry for peaknet-daemon CXI files (slab layout: panels stacked along ss).",
        f"; frame (panels, H, W) = ({p}, {h}, {w}) -> slab ({p * h}, {w}).",
        "; Panel corners are a placeholder grid: replace them with the detector's metrology.",
        "",
        f"photon_energy = {PHOTON_ENERGY}",
        f"clen = {DETECTOR_DISTANCE}",
        f"coffset = {coffset_m:g}",
        f"adu_per_eV = {adu_per_eV:.6g}",
        f"res = {1.0 / pixel_size_m:.6g}",
        "",
        f"data = {DATA}",
        f"peak_list = {RESULT}",
        "dim0 = %",
        "dim1 = ss",
        "dim2 = fs",
        "",
    ]
    for i in range(p):
        r, c = divmod(i, cols)
        corner_x = c * (w + gap_px) - width / 2
        corner_y = height / 2 - r * (h + gap_px) - h
        name = f"p{i}"
        lines += [
            f"{name}/min_fs = 0",
            f"{name}/max_fs = {w - 1}",
            f"{name}/min_ss = {i * h}",
            f"{name}/max_ss = {(i + 1) * h - 1}",
            f"{name}/fs = +1.000000x +0.000000y",
            f"{name}/ss = +0.000000x +1.000000y",
            f"{name}/corner_x = {corner_x:g}",
            f"{name}/corner_y = {corner_y:g}",
            "",
        ]
    return "\n".join(lines)
