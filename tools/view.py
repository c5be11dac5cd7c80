#!/usr/bin/env python3
"""Look at what the finder did: a frame with its peaks, or hit rate and peaks per frame of a run.

    # a frame (all panels in a grid), found peaks circled, true peaks marked with +
    python tools/view.py frame --simulate 12345 --out frame.png
    python tools/view.py frame --input frame.npy --truth truth.jsonl --seq 7 --out frame.png
    python tools/view.py frame --input run.cxi --index 3 --out frame.png   # peaks from the file
    # hit rate and peaks per frame from a results file (msgpack peaknet-result/1) or CXI files
    python tools/view.py rates --results results.msgpack run-*.cxi --out rates.png

Found peaks come from the file when it has them (CXI), else from running a finder
(`--finder peaknet|classical|none`, the daemon's own reference loop). matplotlib (the `view`
extra) is imported only here, with the Agg backend, so this works on headless nodes.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from peaknet_daemon.evaluation import PeakList, peaks_of

CXI_DATA = "/entry_1/data_1/data"
CXI_RESULT = "/entry_1/result_1"
KNOWN_PANEL_HEIGHTS = (352, 512)  # epix10k2M, Jungfrau


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("tools/view.py needs matplotlib: pip install 'peaknet-daemon[view]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------
# Reading frames and peaks
# ------------------------------------------------------------------------------------------------

def panels_of_slab(height: int, panels: Optional[int]) -> int:
    """Panels stacked in a (P*H, W) slab: given, or guessed from known panel heights."""
    if panels:
        return panels
    for h in KNOWN_PANEL_HEIGHTS:
        if height % h == 0:
            return height // h
    return 1


def read_cxi_event(path: Path, index: int, panels: Optional[int]) -> tuple[np.ndarray, Optional[PeakList], int]:
    """(frame (P,H,W), peaks stored in the file, seq) of one CXI event."""
    import h5py

    with h5py.File(path, "r") as f:
        slab = np.asarray(f[CXI_DATA][index])
        p = panels_of_slab(slab.shape[0], panels)
        h = slab.shape[0] // p
        frame = slab.reshape(p, h, slab.shape[1])
        seq = int(f["/entry_1/seq"][index]) if "/entry_1/seq" in f else index
        if CXI_RESULT + "/nPeaks" not in f:
            return frame, None, seq
        r = f[CXI_RESULT]
        n = int(r["nPeaks"][index])
        y_slab = np.asarray(r["peakYPosRaw"][index, :n], np.float64)
        x = np.asarray(r["peakXPosRaw"][index, :n], np.float64)
        panel = (np.asarray(r["peakSegPosRaw"][index, :n], np.int64) if "peakSegPosRaw" in r
                 else (y_slab // h).astype(np.int64))
        return frame, PeakList(panel, y_slab - panel * h, x), seq


def read_frame(path: Path, index: int, dataset: str, panels: Optional[int]) -> tuple[np.ndarray, Optional[PeakList], int]:
    """A frame from .npy (P,H,W)/(H,W)/(N,P,H,W), an HDF5/CXI dataset, plus peaks the file holds."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 4:
            arr = arr[index]
        return (arr[None] if arr.ndim == 2 else arr), None, index
    if suffix == ".cxi" and dataset == CXI_DATA:
        return read_cxi_event(path, index, panels)
    import h5py

    with h5py.File(path, "r") as f:
        arr = np.asarray(f[dataset][index])
        parent = f[dataset].parent
        seq = int(parent["seq"][index]) if "seq" in parent else index  # recorder files carry seq
    if arr.ndim == 2:
        p = panels_of_slab(arr.shape[0], panels)
        arr = arr.reshape(p, arr.shape[0] // p, arr.shape[1])
    return arr, None, seq


def run_finder(frame: np.ndarray, finder: str, checkpoint: str, threshold: Optional[float], device: str) -> PeakList:
    """Peaks of one frame from the daemon's reference loop (finder + on-device extraction)."""
    from peaknet_daemon.config import config_from_dict
    from peaknet_daemon.pipeline import run_sequential

    model: dict[str, Any] = {"preset": "classical"} if finder == "classical" else \
        {"preset": finder if finder.startswith("peaknet-") else "peaknet-atto", "checkpoint": checkpoint}
    if threshold is not None and finder != "classical":
        model["threshold"] = threshold
    cfg = config_from_dict({"model": model, "pipeline": {
        "frame_shape": list(frame.shape), "dtype": "float32", "batch_size": 1, "device": device}})
    return peaks_of(run_sequential(cfg, [frame.astype(np.float32)])[0])


def truth_for(path: Path, seq: int) -> PeakList:
    from peaknet_producers.truth import read_truth

    table = read_truth(path)
    if seq not in table:
        raise SystemExit(f"{path}: no truth for seq {seq} (has {min(table, default=None)}..{max(table, default=None)})")
    return PeakList.from_columns(table[seq])


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def grid(panels: int) -> tuple[int, int]:
    """Rows, columns: a square-ish grid (4 x 4 for the 16 epix10k2M panels)."""
    cols = math.ceil(math.sqrt(panels))
    return math.ceil(panels / cols), cols


def render_frame(frame: np.ndarray, found: Optional[PeakList], truth: Optional[PeakList], out: Path,
                 title: str = "", log_scale: bool = False) -> None:
    """All panels in a grid, found peaks as red circles, true peaks as cyan crosses."""
    plt = _pyplot()
    p, h, w = frame.shape
    rows, cols = grid(p)
    scale = 4.0 / max(h, w)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * w * scale + 0.5, rows * h * scale + 0.8), squeeze=False)
    img = np.log1p(np.clip(frame.astype(np.float64), 0, None)) if log_scale else frame.astype(np.float64)
    finite = img[np.isfinite(img)]
    vmin, vmax = (np.percentile(finite, [1.0, 99.7]) if finite.size else (0.0, 1.0))
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= p:
            ax.axis("off")
            continue
        ax.imshow(img[i], cmap="gray_r", vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
        ax.set_title(f"panel {i}", fontsize=7, pad=2)
        if truth is not None:
            sel = truth.panel == i
            ax.plot(truth.x[sel], truth.y[sel], "+", color="tab:cyan", ms=5, mew=0.8, ls="none")
        if found is not None:
            sel = found.panel == i
            ax.plot(found.x[sel], found.y[sel], "o", mfc="none", mec="tab:red", ms=7, mew=0.8, ls="none")
    handles = []
    if found is not None:
        handles.append(plt.Line2D([], [], marker="o", mfc="none", mec="tab:red", ls="none",
                                  label=f"found ({len(found)})"))
    if truth is not None:
        handles.append(plt.Line2D([], [], marker="+", color="tab:cyan", ls="none", label=f"true ({len(truth)})"))
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Rates from results
# ------------------------------------------------------------------------------------------------

def read_results(paths: Iterable[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Peaks per frame and hit flags (None -> NaN) from msgpack results or CXI files, in order."""
    n_peaks: list[float] = []
    hits: list[float] = []
    for path in paths:
        if path.suffix.lower() in (".cxi", ".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                n = np.asarray(f[CXI_RESULT + "/nPeaks"][()], np.float64)
            n_peaks.extend(n.tolist())
            hits.extend([math.nan] * len(n))
            continue
        import msgpack

        with open(path, "rb") as fh:
            for msg in msgpack.Unpacker(fh, raw=False):
                if not isinstance(msg, dict) or msg.get("proto", "peaknet-result/1") != "peaknet-result/1":
                    continue
                n_peaks.append(float(msg.get("n_peaks", len(msg.get("peaks", {}).get("y", [])))))
                hit = msg.get("hit")
                hits.append(math.nan if hit is None else float(bool(hit)))
    return np.asarray(n_peaks), np.asarray(hits)


def render_rates(n_peaks: np.ndarray, hits: np.ndarray, hit_threshold: int, window: int, out: Path,
                 title: str = "") -> dict[str, float]:
    """Peaks per frame (and their histogram) and the rolling hit rate; returns the totals."""
    plt = _pyplot()
    hits = np.where(np.isnan(hits), (n_peaks >= hit_threshold).astype(np.float64), hits)
    idx = np.arange(len(n_peaks))
    win = max(1, min(window, len(hits)))
    rate = np.convolve(hits, np.ones(win) / win, mode="valid") if len(hits) else np.zeros(0)
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(8, 8))
    a1.plot(idx, n_peaks, ".", ms=2, color="tab:blue")
    a1.axhline(hit_threshold, color="tab:red", lw=0.8, ls="--", label=f"hit threshold {hit_threshold}")
    a1.set_xlabel("frame")
    a1.set_ylabel("peaks per frame")
    a1.legend(fontsize=8)
    a2.plot(np.arange(len(rate)) + win - 1, 100 * rate, color="tab:green")
    a2.set_xlabel("frame")
    a2.set_ylabel(f"hit rate, %, last {win} frames")
    a2.set_ylim(-2, 102)
    a3.hist(n_peaks, bins=min(60, max(5, int(n_peaks.max(initial=1)) + 1)), color="tab:gray")
    a3.set_xlabel("peaks per frame")
    a3.set_ylabel("frames")
    totals = {"frames": int(len(n_peaks)), "hit_rate": float(hits.mean()) if len(hits) else 0.0,
              "mean_peaks": float(n_peaks.mean()) if len(n_peaks) else 0.0}
    fig.suptitle(f"{title}  {totals['frames']} frames, hit rate {100 * totals['hit_rate']:.1f} %, "
                 f"{totals['mean_peaks']:.1f} peaks/frame", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return totals


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Render frames with peaks, or hit-rate plots, as PNG.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fr = sub.add_parser("frame", help="a frame with found (and true) peaks")
    src = fr.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help=".npy, .h5 or .cxi file")
    src.add_argument("--simulate", type=int, metavar="SEED", help="a simulated held-out frame (truth included)")
    fr.add_argument("--index", type=int, default=0, help="event / frame index in --input (or seq with --simulate)")
    fr.add_argument("--dataset", default=CXI_DATA, help="HDF5 dataset of frames")
    fr.add_argument("--panels", type=int, default=None, help="panels in a (P*H, W) slab (default: guess)")
    fr.add_argument("--detector", default="epix10k2m", help="with --simulate: detector name or P,H,W")
    fr.add_argument("--truth", type=Path, default=None, help="truth file (JSON lines or .h5) of the run")
    fr.add_argument("--seq", type=int, default=None, help="seq of the frame in --truth (default: the file's seq or --index)")
    fr.add_argument("--finder", default="auto", help="auto (the file's peaks, else peaknet) | peaknet | classical | none")
    fr.add_argument("--checkpoint", default="default")
    fr.add_argument("--threshold", type=float, default=None)
    fr.add_argument("--device", default="cpu")
    fr.add_argument("--log", action="store_true", help="log intensity scale")
    fr.add_argument("--out", type=Path, default=Path("frame.png"))
    ra = sub.add_parser("rates", help="hit rate and peaks per frame of a run")
    ra.add_argument("--results", type=Path, nargs="+", required=True, help="msgpack results files and/or CXI files")
    ra.add_argument("--hit-threshold", type=int, default=10, help="for sources without a hit flag (CXI)")
    ra.add_argument("--window", type=int, default=100, help="frames in the rolling hit rate")
    ra.add_argument("--out", type=Path, default=Path("rates.png"))
    return ap.parse_args(argv)


def frame_main(args: argparse.Namespace) -> int:
    truth: Optional[PeakList] = None
    stored: Optional[PeakList] = None
    if args.simulate is not None:
        from peaknet_daemon.evaluation import heldout_frames, truth_from_sim
        from evaluate import detector_shape  # tools/ is on sys.path when run as a script

        sim = heldout_frames(detector_shape(args.detector), args.index + 1, args.simulate)[args.index]
        frame, seq = np.asarray(sim.data), args.index
        truth, _ = truth_from_sim(sim)
        name = f"simulated seed {args.simulate} seq {seq}"
    else:
        frame, stored, seq = read_frame(args.input, args.index, args.dataset, args.panels)
        name = f"{args.input.name} [{args.index}]"
    if args.truth is not None:
        truth = truth_for(args.truth, args.seq if args.seq is not None else seq)
    finder = args.finder
    if finder == "auto":
        finder = "stored" if stored is not None else "peaknet"
    found = stored if finder == "stored" else None if finder == "none" else \
        run_finder(frame, finder, args.checkpoint, args.threshold, args.device)
    render_frame(frame, found, truth, args.out, f"{name}  finder: {finder}", args.log)
    print(f"{args.out}: {frame.shape[0]} panels, {0 if found is None else len(found)} found, "
          f"{'-' if truth is None else len(truth)} true")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.cmd == "frame":
        return frame_main(args)
    n_peaks, hits = read_results(args.results)
    if len(n_peaks) == 0:
        raise SystemExit("no results found in " + ", ".join(map(str, args.results)))
    totals = render_rates(n_peaks, hits, args.hit_threshold, args.window, args.out,
                          ", ".join(p.name for p in args.results[:3]))
    print(f"{args.out}: {totals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
