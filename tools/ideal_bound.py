#!/usr/bin/env python3
"""How far any peak finder can go on the evaluation's frames: an ideal detector's recall and F1
per SNR bin, next to which `tools/evaluate.py`'s figures can be read.

The simulators report every true peak's expected signal s (photons, over its window) and the
noise variance v of those pixels without it (`PeakObserver`). A detector that knew s, v and the
background exactly, and tested the peak's own place, would use the matched filter
T = sum(s (d - b) / v) / sqrt(A), A = sum(s^2 / v): T is ~N(0, 1) on background alone, and on the
peak its mean is sqrt(A) and its variance sum(s^2 (v + s) / v^2) / A (the peak's own shot noise).

A finder does not know where the peaks are: it scans every pixel and every spot size, and its
threshold t must keep the scan's false maxima on noise at what a precision allows. This tool
counts the local maxima (3 x 3) of a bank of Gaussian filters (sigma 0.6-2.0 px) on white noise
of the family's frame size, takes t where they number (1/precision - 1) x true peaks per frame,
and reports per bin the recall bound, the mean P(T > t), and the F1 bound 2PR / (P + R).

It bounds finders that judge each spot on its own, as peakfinder8 and PeakNet's local receptive
field do: at a known place no test beats the likelihood ratio (Neyman-Pearson), and scanning
only costs more. The Gaussian model of the noise is the one approximation (the backgrounds are
a few photons per pixel). A finder that used the lattice (indexing first) could go further.

    python tools/ideal_bound.py                       # the three families, 16 frames each
    python tools/ideal_bound.py --families bragg --frames 32 --json bound.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage, special

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from peaknet_daemon.evaluation import SNR_EDGES, bin_label, heldout_frames  # noqa: E402

FAMILIES = ("lattice", "heldout-jungfrau-diffuse", "bragg")
SCAN_SIGMAS = (0.6, 0.8, 1.0, 1.3, 1.6, 2.0)
PRECISIONS = (0.97, 0.98, 0.99)


class PeakStats:
    """A PeakObserver that keeps, per true peak, its SNR, sqrt(A) and the spread of T on it."""

    def __init__(self) -> None:
        self.snr: list[float] = []
        self.mean: list[float] = []
        self.spread: list[float] = []

    def __call__(self, snr: float, signal: np.ndarray, variance: np.ndarray) -> None:
        v = np.maximum(variance, 1e-6)
        a = float((signal * signal / v).sum())
        self.snr.append(float(snr))
        self.mean.append(math.sqrt(a))
        self.spread.append(math.sqrt(float((signal * signal * (v + signal) / v ** 2).sum()) / max(a, 1e-12)))


def scan_maxima(shape: Sequence[int], frames: int, seed: int = 0, sigmas: Sequence[float] = SCAN_SIGMAS) -> np.ndarray:
    """Values of the local maxima of the filter bank's best response on `frames` white-noise
    frames, each filter scaled to unit variance; sorted, largest first."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        z = rng.standard_normal(tuple(shape))
        best = None
        for s in sigmas:
            r = int(math.ceil(4 * s))
            k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
            g = ndimage.convolve1d(ndimage.convolve1d(z, k, axis=-2, mode="reflect"), k, axis=-1, mode="reflect")
            g /= float((k ** 2).sum())  # the 2-D kernel's norm: a separable product
            best = g if best is None else np.maximum(best, g)
        peaks = best == ndimage.maximum_filter(best, size=(1,) * (len(shape) - 2) + (3, 3))
        out.append(best[peaks])
    return np.sort(np.concatenate(out))[::-1]


def threshold(maxima: np.ndarray, noise_frames: int, false_per_frame: float) -> float:
    """The scan threshold that lets `false_per_frame` false maxima through per frame."""
    k = max(int(round(false_per_frame * noise_frames)), 1)
    return float(maxima[min(k, len(maxima)) - 1])


def detection_probability(mean: np.ndarray, spread: np.ndarray, t: float) -> np.ndarray:
    """P(T > t) for T ~ N(mean, spread^2)."""
    return 0.5 * special.erfc((t - mean) / (spread * math.sqrt(2.0)))


def bound(stats: PeakStats, frames: int, maxima: np.ndarray, noise_frames: int,
          precisions: Sequence[float] = PRECISIONS, edges: Sequence[float] = SNR_EDGES) -> list[dict]:
    """Per precision, the threshold and per SNR bin n, recall bound and F1 bound."""
    snr, mean, spread = (np.asarray(v, np.float64) for v in (stats.snr, stats.mean, stats.spread))
    per_frame = len(snr) / max(frames, 1)
    bounds = [-np.inf, *edges, np.inf]
    rows = []
    for p in precisions:
        t = threshold(maxima, noise_frames, (1.0 / p - 1.0) * per_frame)
        pd = detection_probability(mean, spread, t)
        bins = {}
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            sel = (snr >= lo) & (snr < hi)
            if sel.any():
                r = float(pd[sel].mean())
                bins[bin_label(lo, hi)] = {"n_true": int(sel.sum()), "recall": r, "f1": 2 * p * r / (p + r)}
        rows.append({"precision": p, "threshold": t, "false_per_frame": (1.0 / p - 1.0) * per_frame, "bins": bins})
    return rows


def family_stats(name: str, frames: int, seed: int, detector: str) -> tuple[PeakStats, tuple[int, ...]]:
    """The family's frames as tools/evaluate.py makes them, with every true peak observed."""
    from evaluate import detector_shape

    stats = PeakStats()
    if name == "bragg":
        shape = detector_shape(detector)
        heldout_frames(shape, frames, seed, on_peak=stats)
        return stats, tuple(shape)
    from peaknet_producers.diffraction import family_frames

    ff = family_frames(name, frames, seed, on_peak=stats)
    return stats, tuple(ff.shape)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--frames", type=int, default=16, help="frames per family")
    ap.add_argument("--seed", type=int, default=12345, help="the evaluation's seed")
    ap.add_argument("--detector", default="4,352,384", help="bragg family: a preset or P,H,W")
    ap.add_argument("--noise-frames", type=int, default=4, help="white-noise frames for the scan's false maxima")
    ap.add_argument("--json", help="write the bounds here")
    args = ap.parse_args(argv)
    report = {}
    print(f"{'family':<26}{'precision':>10}{'t':>7}{'SNR':>8}{'n_true':>8}{'recall<=':>10}{'F1<=':>8}")
    for name in args.families.split(","):
        stats, shape = family_stats(name, args.frames, args.seed, args.detector)
        maxima = scan_maxima(shape, args.noise_frames)
        rows = bound(stats, args.frames, maxima, args.noise_frames)
        report[name] = {"frames": args.frames, "shape": list(shape), "true_peaks": len(stats.snr), "rows": rows}
        for row in rows:
            for b, v in row["bins"].items():
                print(f"{name:<26}{row['precision']:>10.2f}{row['threshold']:>7.2f}{b:>8}{v['n_true']:>8}"
                      f"{v['recall']:>10.3f}{v['f1']:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
