"""Ground truth of simulated frames, written as frames are sent: JSON lines or HDF5.

JSON lines: one object per frame, `{"source", "run", "seq", "hit", "n_peaks", "panel", "y",
"x", "intensity", "snr"}` (columns as lists). HDF5: one row per peak in `/peaks/{seq, panel, y,
x, intensity, snr}` and one per frame in `/frames/{seq, n_peaks, hit}`, with `source` and `run`
as file attributes. Positions follow the pixel-centre convention (see bragg.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PEAK_KEYS = ("panel", "y", "x", "intensity", "snr")


def truth_record(source: str, run: int | str, seq: int, peaks: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON-lines object for one frame."""
    n = int(len(peaks["panel"]))
    rec: dict[str, Any] = {"source": source, "run": run, "seq": int(seq), "hit": n > 0, "n_peaks": n}
    for key in PEAK_KEYS:
        rec[key] = np.asarray(peaks[key]).tolist()
    return rec


class TruthWriter:
    """Appends one frame's truth at a time; the format follows the suffix (.h5/.hdf5 or else
    JSON lines)."""

    def __init__(self, path: str | Path, source: str, run: int | str):
        self.path, self.source, self.run = Path(path), source, run
        self.h5 = self.path.suffix.lower() in (".h5", ".hdf5")
        self._rows: dict[str, list] = {k: [] for k in ("seq", "n_peaks", "hit", *[f"p_{k}" for k in PEAK_KEYS], "p_seq")}
        self._fh = None if self.h5 else open(self.path, "w", encoding="utf-8")

    def write(self, seq: int, peaks: dict[str, np.ndarray]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(truth_record(self.source, self.run, seq, peaks)) + "\n")
            return
        n = len(peaks["panel"])
        self._rows["seq"].append(seq)
        self._rows["n_peaks"].append(n)
        self._rows["hit"].append(n > 0)
        self._rows["p_seq"].extend([seq] * n)
        for key in PEAK_KEYS:
            self._rows[f"p_{key}"].extend(np.asarray(peaks[key]).tolist())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            return
        import h5py

        with h5py.File(self.path, "w") as f:
            f.attrs["source"], f.attrs["run"] = self.source, str(self.run)
            for key in ("seq", "n_peaks", "hit"):
                f[f"frames/{key}"] = np.asarray(self._rows[key], dtype=bool if key == "hit" else np.int64)
            f["peaks/seq"] = np.asarray(self._rows["p_seq"], dtype=np.int64)
            f["peaks/panel"] = np.asarray(self._rows["p_panel"], dtype=np.int32)
            for key in ("y", "x", "intensity", "snr"):
                f[f"peaks/{key}"] = np.asarray(self._rows[f"p_{key}"], dtype=np.float64)

    def __enter__(self) -> "TruthWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_truth(path: str | Path) -> dict[int, dict[str, Any]]:
    """Truth per seq from either format: {seq: {"hit", "n_peaks", "panel", "y", ...}}."""
    path = Path(path)
    out: dict[int, dict[str, Any]] = {}
    if path.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            pseq = f["peaks/seq"][()]
            cols = {k: f[f"peaks/{k}"][()] for k in PEAK_KEYS}
            for seq, n in zip(f["frames/seq"][()], f["frames/n_peaks"][()]):
                sel = pseq == seq
                out[int(seq)] = {"hit": bool(n), "n_peaks": int(n), **{k: v[sel] for k, v in cols.items()}}
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out[rec["seq"]] = {**rec, **{k: np.asarray(rec[k]) for k in PEAK_KEYS}}
    return out
