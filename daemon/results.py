"""Host-side result types and the conversion from the compact device peak arrays.

The device hands back fixed-size arrays per panel image (`peaks (N, max_peaks, 4)`, `counts`,
`overflow`); consumers want one peak list per frame with a panel column. The conversion is
vectorised over the whole batch so the result thread stays cheap at thousands of frames/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FramePeaks:
    """Peaks of one frame, concatenated over its panels (pixel-centre convention)."""

    panel: np.ndarray  # int16 (int32 for > 32767 panels)
    y: np.ndarray  # float32
    x: np.ndarray  # float32
    intensity: np.ndarray  # float32
    npix: np.ndarray  # int32
    n_peaks: int
    overflow: int  # peaks dropped because a panel had more than max_peaks

    def as_array(self) -> np.ndarray:
        """(n_peaks, 5) float64 [panel, y, x, intensity, npix], handy for comparisons."""
        return np.stack([self.panel.astype(np.float64), self.y, self.x, self.intensity,
                         self.npix.astype(np.float64)], axis=1)


@dataclass
class BatchResult:
    """One submitted batch: the caller's tags and the peaks of its real (unpadded) frames."""

    tags: list
    frames: list[FramePeaks]
    submitted_at: float  # time.perf_counter() at submit
    done_at: float  # time.perf_counter() when collect saw the D2H finish
    padded_peaks: int = field(default=0)  # peaks found in padding entries; always 0 unless broken
    inputs: list | None = None  # per frame: a copy of its input data when asked for, else None
    nonfinite: list = field(default_factory=list)  # indices of frames that held NaN or Inf (no peaks)


def split_frames(peaks: np.ndarray, counts: np.ndarray, overflow: np.ndarray,
                 n_frames: int, panels: int) -> tuple[list[FramePeaks], int]:
    """Turn per-image compact arrays into per-frame peak lists for the first `n_frames` frames.

    `peaks` is (N, max_peaks, 4) [y, x, intensity, npix] with N = batch * panels; only the first
    `counts[i]` rows of image i are real. Returns the frames and the peak count in padding.
    The arrays may be views of a pinned slot: everything returned is a copy.
    """
    n_img = n_frames * panels
    all_counts = np.asarray(counts, dtype=np.int64)
    padded = int(all_counts[n_img:].sum() + np.asarray(overflow[n_img:], dtype=np.int64).sum())
    counts = all_counts[:n_img]
    max_peaks = peaks.shape[1]
    keep = np.arange(max_peaks)[None, :] < np.minimum(counts, max_peaks)[:, None]
    img_idx, _ = np.nonzero(keep)  # row-major: grouped by image, then peak order
    rows = peaks[:n_img][keep]  # (total, 4) copy
    panel_dtype = np.int16 if panels <= np.iinfo(np.int16).max else np.int32
    panel_all = (img_idx % panels).astype(panel_dtype)
    per_frame = np.minimum(counts, max_peaks).reshape(n_frames, panels).sum(axis=1)
    ovf = np.asarray(overflow[:n_img], dtype=np.int64).reshape(n_frames, panels).sum(axis=1)
    bounds = np.concatenate([[0], np.cumsum(per_frame)])
    frames = []
    for f in range(n_frames):
        a, b = bounds[f], bounds[f + 1]
        r = rows[a:b]
        frames.append(FramePeaks(
            panel=panel_all[a:b], y=np.ascontiguousarray(r[:, 0], dtype=np.float32),
            x=np.ascontiguousarray(r[:, 1], dtype=np.float32),
            intensity=np.ascontiguousarray(r[:, 2], dtype=np.float32),
            npix=np.rint(r[:, 3]).astype(np.int32), n_peaks=int(b - a), overflow=int(ovf[f])))
    return frames, padded

