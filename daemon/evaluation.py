"""Peak-finding accuracy against ground truth: matching, SNR-binned metrics, hit finding.

Used by `tools/evaluate.py`, `tools/train.py` (validation, threshold choice) and the accuracy
test, so all three count the same way. numpy only (scipy is a test dependency, not a runtime one).

Counting rules
--------------
* A found peak matches a true peak in the same panel within `radius` px (default 1.5), one to
  one: candidate pairs are taken nearest first (greedy), each peak used at most once.
* Every true peak falls in an SNR bin by its true SNR (edges 2, 3, 5, 10; plus a "<2" bin).
  A matched pair is a true positive of the true peak's bin; an unmatched true peak a false
  negative of its bin.
* An unmatched found peak is a false positive. It is charged to the bin of the nearest true peak
  in its panel when that one lies within `attribution_radius` (default 4 px: split peaks, peaks
  found off-centre); otherwise it is "spurious" (noise, hot pixels, rings) and is shared among the
  bins in proportion to their number of true peaks. So a finder that invents peaks loses
  precision in every bin, and the bins' TP + FP add up to the number of found peaks.
* Per bin: recall = TP / (TP + FN), precision = TP / (TP + FP), F1 their harmonic mean.
  Cumulative rows ">=3", ">=5", ... sum the bins at and above the edge.
* Ignored peaks (`SimFrame.ignore`: drawn reflections too faint or cut to count as truth): an
  unmatched found peak within `radius` of one is dropped, neither true nor false positive.
* Position error: the distance of each matched pair; per bin, its root mean square (`rms_px`).
* Hit finding: a frame is found a hit with at least `hit_threshold` found peaks; the true label is
  the simulator's `meta["hit"]` when given, else at least `hit_threshold` true peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

SNR_EDGES: tuple[float, ...] = (2.0, 3.0, 5.0, 10.0)


def bin_label(lo: float, hi: float) -> str:
    """An SNR bin's name: "<2", "3-5", ">=10"."""
    if lo == -np.inf:
        return f"<{hi:g}"
    if hi == np.inf:
        return f">={lo:g}"
    return f"{lo:g}-{hi:g}"


@dataclass(frozen=True)
class PeakList:
    """Peaks of one frame as columns (pixel-centre convention); `snr` only for truth."""

    panel: np.ndarray
    y: np.ndarray
    x: np.ndarray
    intensity: Optional[np.ndarray] = None
    snr: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(len(self.y))

    @staticmethod
    def from_columns(cols: Mapping[str, Any]) -> "PeakList":
        """From a mapping such as SimFrame.peaks or a result message's `peaks`."""
        y = np.asarray(cols.get("y", []), dtype=np.float64).reshape(-1)
        panel = cols.get("panel")
        panel = np.zeros(len(y), np.int64) if panel is None else np.asarray(panel, np.int64).reshape(-1)
        opt = {k: (None if cols.get(k) is None else np.asarray(cols[k], np.float64).reshape(-1))
               for k in ("intensity", "snr")}
        return PeakList(panel, y, np.asarray(cols.get("x", []), np.float64).reshape(-1), **opt)


def match_peaks(found_yx: np.ndarray, true_yx: np.ndarray, radius: float = 1.5
                ) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching within `radius`, nearest pairs first.

    Returns (found_index, true_index) of the matched pairs. Greedy nearest-first is one-to-one
    and, for peaks farther apart than 2*radius, identical to an optimal assignment.
    """
    f = np.asarray(found_yx, np.float64).reshape(-1, 2)
    t = np.asarray(true_yx, np.float64).reshape(-1, 2)
    empty = np.zeros(0, np.int64)
    if len(f) == 0 or len(t) == 0:
        return empty, empty.copy()
    d = np.hypot(f[:, None, 0] - t[None, :, 0], f[:, None, 1] - t[None, :, 1])
    fi, ti = np.nonzero(d <= radius)
    order = np.argsort(d[fi, ti], kind="stable")
    used_f = np.zeros(len(f), bool)
    used_t = np.zeros(len(t), bool)
    out_f, out_t = [], []
    for k in order:
        a, b = fi[k], ti[k]
        if not used_f[a] and not used_t[b]:
            used_f[a] = used_t[b] = True
            out_f.append(a)
            out_t.append(b)
    return np.asarray(out_f, np.int64), np.asarray(out_t, np.int64)


@dataclass
class FrameMatch:
    """Outcome of matching one frame: which true peaks were found, where the misses go."""

    true_found: np.ndarray  # bool per true peak
    true_dist: np.ndarray  # distance (px) to the matched found peak per true peak; nan if missed
    fp_bin_snr: np.ndarray  # SNR of the nearest true peak of each attributed false positive
    n_spurious: int
    n_found: int  # found peaks that count (those on ignored peaks excluded)
    n_ignored: int = 0


def match_frame(found: PeakList, truth: PeakList, radius: float = 1.5,
                attribution_radius: float = 4.0, ignore: Optional[PeakList] = None) -> FrameMatch:
    """Match per panel; drop unmatched found peaks on ignored ones; attribute the rest (see the
    module doc)."""
    true_found = np.zeros(len(truth), bool)
    true_dist = np.full(len(truth), np.nan)
    snr = truth.snr if truth.snr is not None else np.full(len(truth), np.inf)
    fp_snr: list[float] = []
    spurious = 0
    n_ignored = 0
    for p in np.union1d(np.unique(found.panel), np.unique(truth.panel)):
        fsel = np.nonzero(found.panel == p)[0]
        tsel = np.nonzero(truth.panel == p)[0]
        fyx = np.stack([found.y[fsel], found.x[fsel]], 1)
        tyx = np.stack([truth.y[tsel], truth.x[tsel]], 1)
        mf, mt = match_peaks(fyx, tyx, radius)
        true_found[tsel[mt]] = True
        true_dist[tsel[mt]] = np.hypot(*(fyx[mf] - tyx[mt]).T)
        unmatched = np.setdiff1d(np.arange(len(fsel)), mf)
        if len(unmatched) and ignore is not None and len(ignore):
            isel = ignore.panel == p
            iyx = np.stack([ignore.y[isel], ignore.x[isel]], 1)
            if len(iyx):
                d_ign = np.hypot(fyx[unmatched, None, 0] - iyx[None, :, 0], fyx[unmatched, None, 1] - iyx[None, :, 1])
                dropped = d_ign.min(1) <= radius
                n_ignored += int(dropped.sum())
                unmatched = unmatched[~dropped]
        if len(unmatched) == 0:
            continue
        if len(tsel) == 0:
            spurious += len(unmatched)
            continue
        d = np.hypot(fyx[unmatched, None, 0] - tyx[None, :, 0], fyx[unmatched, None, 1] - tyx[None, :, 1])
        nearest = d.argmin(1)
        near = d[np.arange(len(unmatched)), nearest] <= attribution_radius
        fp_snr.extend(snr[tsel[nearest[near]]].tolist())
        spurious += int((~near).sum())
    return FrameMatch(true_found, true_dist, np.asarray(fp_snr, np.float64), spurious, len(found) - n_ignored,
                      n_ignored)


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


@dataclass
class AccuracyTally:
    """Accumulates peak and hit counts over frames; `summary()` gives the metrics."""

    radius: float = 1.5
    attribution_radius: float = 4.0
    hit_threshold: int = 10
    edges: tuple[float, ...] = SNR_EDGES
    tp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    spurious: int = 0
    found: int = 0
    ignored: int = 0
    frames: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})

    def __post_init__(self) -> None:
        self._bounds = np.asarray((-np.inf, *self.edges, np.inf))
        n = len(self._bounds) - 1
        self.tp, self.fn, self.fp = (np.zeros(n, np.int64) for _ in range(3))
        self.sq_err = np.zeros(n, np.float64)  # sum of squared position errors of the matches

    def _bin(self, snr: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._bounds, snr, side="right") - 1

    def add(self, found: PeakList, truth: PeakList, true_hit: Optional[bool] = None,
            ignore: Optional[PeakList] = None) -> FrameMatch:
        """Match one frame and add its counts; `ignore`: peaks that are neither truth nor noise."""
        m = match_frame(found, truth, self.radius, self.attribution_radius, ignore)
        snr = truth.snr if truth.snr is not None else np.full(len(truth), np.inf)
        nb = len(self.tp)
        b = self._bin(snr)
        self.tp += np.bincount(b[m.true_found], minlength=nb)
        self.sq_err += np.bincount(b[m.true_found], weights=m.true_dist[m.true_found] ** 2, minlength=nb)
        self.fn += np.bincount(b[~m.true_found], minlength=nb)
        self.fp += np.bincount(self._bin(m.fp_bin_snr), minlength=nb)
        self.spurious += m.n_spurious
        self.found += m.n_found
        self.ignored += m.n_ignored
        self.frames += 1
        is_hit = bool(true_hit) if true_hit is not None else len(truth) >= self.hit_threshold
        said_hit = len(found) >= self.hit_threshold
        self.hits[("t" if is_hit == said_hit else "f") + ("p" if said_hit else "n")] += 1
        return m

    def _row(self, sel: np.ndarray) -> dict[str, float]:
        n_true = self.tp + self.fn
        share = n_true / max(int(n_true.sum()), 1)
        tp, fn = float(self.tp[sel].sum()), float(self.fn[sel].sum())
        fp = float(self.fp[sel].sum() + self.spurious * share[sel].sum())
        p = tp / (tp + fp) if tp + fp else (1.0 if tp + fn == 0 else 0.0)
        r = tp / (tp + fn) if tp + fn else 1.0
        rms = math.sqrt(float(self.sq_err[sel].sum()) / tp) if tp else float("nan")
        return {"n_true": int(tp + fn), "tp": int(tp), "fn": int(fn), "fp": fp,
                "precision": p, "recall": r, "f1": _f1(p, r), "rms_px": rms}

    def summary(self) -> dict[str, Any]:
        """Per-bin and cumulative rows, overall, and hit-finding metrics."""
        lo, hi = self._bounds[:-1], self._bounds[1:]
        idx = np.arange(len(lo))
        bins = {bin_label(a, b): self._row(idx == i) for i, (a, b) in enumerate(zip(lo, hi))}
        cumulative = {f">={e:g}": self._row(lo >= e) for e in self.edges}
        h = self.hits
        hp = h["tp"] / (h["tp"] + h["fp"]) if h["tp"] + h["fp"] else 1.0
        hr = h["tp"] / (h["tp"] + h["fn"]) if h["tp"] + h["fn"] else 1.0
        overall = self._row(idx >= 0)
        overall["fp"] = int(self.fp.sum() + self.spurious)
        return {"frames": self.frames, "found": self.found, "spurious": self.spurious, "ignored": self.ignored,
                "radius": self.radius, "bins": bins, "cumulative": cumulative, "overall": overall,
                "hits": {**h, "threshold": self.hit_threshold, "precision": hp, "recall": hr,
                         "f1": _f1(hp, hr)}}


def selection_score(summary: dict[str, Any]) -> float:
    """What tuning and checkpoint selection maximise: F1 of the recall of true peaks with
    SNR >= 3 and the precision over every found peak. Spurious peaks count in full even on
    frames without true peaks (the per-bin rows share them by true-peak count, so there they
    would cost nothing)."""
    return _f1(float(summary["overall"]["precision"]), float(summary["cumulative"][">=3"]["recall"]))


def truth_from_sim(sim: Any) -> tuple[PeakList, Optional[bool]]:
    """Truth of a simulated frame (anything with `.peaks` columns and `.meta`)."""
    meta = getattr(sim, "meta", {}) or {}
    hit = meta.get("hit")
    return PeakList.from_columns(sim.peaks), (None if hit is None else bool(hit))


def ignore_from_sim(sim: Any) -> Optional[PeakList]:
    """The peaks a finder may report or not without being charged (`SimFrame.ignore`), if any."""
    ign = getattr(sim, "ignore", None)
    return PeakList.from_columns(ign) if ign else None


def peaks_from_tensors(peaks: Any, counts: Any) -> PeakList:
    """A frame's PeakList from extract_peaks output for its P panels (image n = panel n)."""
    arr = np.asarray(peaks.detach().float().cpu() if hasattr(peaks, "detach") else peaks)
    cnt = np.asarray(counts.detach().cpu() if hasattr(counts, "detach") else counts).astype(np.int64)
    cnt = np.minimum(cnt, arr.shape[1])
    keep = np.arange(arr.shape[1])[None, :] < cnt[:, None]
    panel = np.broadcast_to(np.arange(arr.shape[0])[:, None], keep.shape)[keep]
    sel = arr[keep]
    return PeakList(panel.astype(np.int64), sel[:, 0].astype(np.float64), sel[:, 1].astype(np.float64),
                    sel[:, 2].astype(np.float64))


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One text table: a row per finder and SNR bin, then hit finding."""
    lines = [f"{'finder':<16}{'SNR':>8}{'n_true':>8}{'prec':>8}{'recall':>8}{'F1':>8}{'rms px':>8}"]
    for name, s in summaries.items():
        rows = {**s["bins"], **{k: v for k, v in s["cumulative"].items() if k != ">=2"},
                "all": s["overall"]}
        for label, r in rows.items():
            lines.append(f"{name:<16}{label:>8}{r['n_true']:>8}{r['precision']:>8.3f}"
                         f"{r['recall']:>8.3f}{r['f1']:>8.3f}{r['rms_px']:>8.3f}")
        h = s["hits"]
        lines.append(f"{name:<16}{'hits':>8}{h['tp'] + h['fn']:>8}{h['precision']:>8.3f}"
                     f"{h['recall']:>8.3f}{h['f1']:>8.3f}   (hit = >= {h['threshold']} peaks; "
                     f"{s['spurious']} spurious of {s['found']} found)")
    return "\n".join(lines)


def peaks_of(found: Any) -> PeakList:
    """A PeakList from anything with panel/y/x(/intensity) attributes or keys (FramePeaks, dict)."""
    if isinstance(found, PeakList):
        return found
    if isinstance(found, Mapping):
        return PeakList.from_columns(found)
    return PeakList.from_columns({k: getattr(found, k, None) for k in ("panel", "y", "x", "intensity")})


def score_frames(found: Iterable[Any], sims: Iterable[Any], radius: float = 1.5,
                 hit_threshold: int = 10, attribution_radius: float = 4.0) -> dict[str, Any]:
    """Tally found peak lists (one per frame, e.g. run_sequential's FramePeaks) against the
    simulated frames (`.peaks`, `.meta`) they came from, in the same order."""
    tally = AccuracyTally(radius, attribution_radius, hit_threshold)
    for f, sim in zip(found, sims, strict=True):
        truth, hit = truth_from_sim(sim)
        tally.add(peaks_of(f), truth, hit, ignore_from_sim(sim))
    return tally.summary()


EPIX_PANEL = (352, 384)


def heldout_config(shape: tuple[int, int, int], snr: tuple[float, float] = (2.0, 40.0),
                   background: float = 2.0, dtype: str = "uint16") -> Any:
    """The simulator config every accuracy figure uses: the simulator's defaults (water ring,
    30 % misses, background 2 photons, 20 hot and 20 dead pixels per 16 panels) with 2.5..15
    peaks per panel in a hit (40..240 per epix frame), and at least 10..60 per hit so hit finding
    at threshold 10 is exercised on small frames too."""
    from peaknet_producers.bragg import BraggConfig  # same distribution; imported only when used

    panels = shape[0] * shape[1] * shape[2] / (EPIX_PANEL[0] * EPIX_PANEL[1])
    defects = max(1, round(20 * panels / 16))
    peaks = (max(10, int(10 * panels / 4)), max(60, int(60 * panels / 4)))
    return BraggConfig(shape=tuple(shape), dtype=dtype, snr_range=tuple(snr), background_photons=background,
                       peaks_per_frame=peaks, hot_pixels=defects, dead_pixels=defects)


def heldout_frames(shape: tuple[int, int, int], frames: int, seed: int = 12345,
                   snr: tuple[float, float] = (2.0, 40.0), background: float = 2.0,
                   on_peak: Optional[Callable] = None) -> list[Any]:
    """Simulated frames with truth. Seeds: 12345 evaluation and tests, 777 training validation;
    training itself draws from other streams. `on_peak`: see peaknet_producers.bragg.PeakObserver."""
    from peaknet_producers.bragg import BraggSimulator

    sim = BraggSimulator(heldout_config(shape, snr, background), seed=seed, on_peak=on_peak)
    return [sim.simulate(i) for i in range(frames)]

