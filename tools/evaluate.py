#!/usr/bin/env python3
"""Peak-finding accuracy of PeakNet, the classical finder and OM's peakfinder8, per SNR bin.

Families of frames (`--families`), each scored apart:
* `lattice`: diffraction frames (`peaknet_producers.diffraction`: a lattice on the Ewald sphere,
  ePix-like panels, rings, ice, jet streaks, gain modes, ...), random configs as training draws
  them, but from seeds training never uses (evaluation 12345, validation 777);
* `heldout-jungfrau-diffuse`: the distribution-shift family, a detector and background model
  that training never sees;
* `bragg`: the older random-spot simulator (`--detector`), kept so that earlier figures can be
  reproduced.

Finders (`--finders`): `peaknet-atto`, `peaknet-small` (weights from --weights, default
daemon/weights/<preset>.safetensors; said and skipped when there are none), `peaknet` (the
--preset/--checkpoint pair), `classical` (daemon's own, defaults), `om` (OnDA Monitor 23.8.3's
peakfinder8 in C, in its own venv: `make .venv-om`). The daemon's finders run through its
reference loop (`run_sequential`: finder, then on-device peak extraction), so the peaks are what
the daemon would emit. OM gets each frame as its slab with the simulator's bad-pixel map and
radius map (as a beamline configures it), and its parameters are tuned per family by a grid
search on that family's validation frames (seed 777), best `selection_score` (recall at SNR >= 3, precision over all found peaks); PeakNet's threshold
and min_pixels come from the training log next to its weights (`<weights>.train.json`) unless
--threshold is given. Counting rules: `peaknet_daemon.evaluation`. Time per frame: the finder
and extraction on --device with batches of 2 (daemon finders, after one warm-up batch), or
OM's `find_peaks` on one CPU core.

    python tools/evaluate.py --frames 16 --json eval.json
    python tools/evaluate.py --families bragg --detector 4,352,384 --frames 10 --finders peaknet,classical
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from peaknet_daemon.config import config_from_dict
from peaknet_daemon.evaluation import (AccuracyTally, PeakList, heldout_frames, ignore_from_sim, peaks_of,
                                       selection_score, truth_from_sim)
from peaknet_daemon.pipeline import build_finder, resolve_device, run_sequential

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "daemon" / "weights"
OM_PYTHON = REPO / ".venv-om" / "bin" / "python"
FAMILIES = ("lattice", "heldout-jungfrau-diffuse", "bragg")
# The grid OM is tuned over: minimum SNR, smallest and largest peak, local background radius,
# ADC threshold in photons (times the frame's ADU per photon is not known to OM: 0 or 1 ADU-photon).
OM_GRID = {"minimum_snr": [4.0, 5.0, 6.0, 7.0, 8.0], "min_pixel_count": [1, 2, 3],
           "max_pixel_count": [30], "local_bg_radius": [3, 4, 6], "adc_threshold": [0.0]}


# ------------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------------

class Family:
    """Frames of one family plus what OM needs per frame (bad-pixel map, radius map)."""

    def __init__(self, name: str, frames: list[Any], bad: list[np.ndarray], radius: list[np.ndarray]):
        self.name, self.frames, self.bad, self.radius = name, frames, bad, radius


def make_family(name: str, n: int, seed: int, detector: str = "epix10k2m") -> Family:
    """`n` frames of family `name` from `seed` (see the module doc)."""
    if name == "bragg":
        from peaknet_producers.bragg import BraggSimulator
        from peaknet_daemon.evaluation import heldout_config

        from peaknet_producers.diffraction import DiffractionConfig, geometry

        shape = detector_shape(detector)
        frames = heldout_frames(shape, n, seed)
        sim = BraggSimulator(heldout_config(shape), seed=seed)
        # The same gap-less mosaic around the beam that places bragg's water ring.
        radius = geometry(DiffractionConfig(shape=shape, panel_gap_px=0)).radius_px.astype(np.float32)
        return Family(name, frames, [sim.bad] * n, [radius] * n)
    from peaknet_producers.diffraction import family_frames

    ff = family_frames(name, n, seed)
    return Family(name, ff.frames, ff.bad, [r.astype(np.float32) for r in ff.radius])


def detector_shape(spec: str) -> tuple[int, int, int]:
    """A detector preset name or P,H,W."""
    from peaknet_producers.bragg import DETECTORS

    if spec in DETECTORS:
        return DETECTORS[spec]
    parts = [int(v) for v in spec.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise SystemExit(f"--detector: a name ({', '.join(DETECTORS)}) or P,H,W; got {spec!r}")
    return parts[0], parts[1], parts[2]


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------

def score(found: list[Any], frames: list[Any], radius: float = 1.5, hit_threshold: int = 10) -> dict[str, Any]:
    """Counts found peak lists against the frames' truth (ignored peaks honoured)."""
    tally = AccuracyTally(radius=radius, hit_threshold=hit_threshold)
    for f, sim in zip(found, frames, strict=True):
        truth, hit = truth_from_sim(sim)
        tally.add(peaks_of(f), truth, hit, ignore_from_sim(sim))
    return tally.summary()


def tuning_score(summary: dict[str, Any]) -> float:
    """What OM's tuning maximises (the same as training's checkpoint choice)."""
    return selection_score(summary)


# ------------------------------------------------------------------------------------------------
# The daemon's finders
# ------------------------------------------------------------------------------------------------

def recommended(checkpoint: Optional[Path]) -> dict[str, Any]:
    """threshold and min_pixels from the log next to the weights: its `operating_point` (the
    release's choice, with its reason) when present, else what tools/train.py picked (`best`)."""
    if checkpoint is None:
        return {}
    log = checkpoint.with_suffix(".train.json")
    if not log.is_file():
        return {}
    data = json.loads(log.read_text())
    point = data.get("operating_point") or data.get("best", {})
    return {k: point[k] for k in ("threshold", "min_pixels") if k in point}


def daemon_finder_config(kind: str, shape: tuple[int, int, int], dtype: str, device: str,
                         preset: str = "peaknet-atto", checkpoint: str = "default",
                         threshold: Optional[float] = None, min_pixels: Optional[int] = None,
                         classical: Optional[dict[str, Any]] = None) -> Any:
    """The daemon config of one finder for frames of this shape and dtype."""
    if kind == "classical":
        model: dict[str, Any] = {"preset": "classical", "classical": classical or {}}
    else:
        model = {"preset": preset, "checkpoint": checkpoint}
        if threshold is not None:
            model["threshold"] = threshold
    pipeline: dict[str, Any] = {"frame_shape": list(shape), "dtype": dtype, "batch_size": 2, "device": device}
    if min_pixels is not None and kind != "classical":
        pipeline["min_pixels"] = min_pixels
    return config_from_dict({"model": model, "pipeline": pipeline})


def run_daemon_finder(frames: list[Any], make_cfg: Any, device: str) -> tuple[list[Any], float]:
    """Found peaks per frame and seconds per frame; frames are grouped by shape and dtype (one
    finder per group), the first batch of each group is a warm-up that is not timed."""
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault((tuple(f.data.shape), str(f.data.dtype)), []).append(i)
    found: list[Any] = [None] * len(frames)
    seconds = 0.0
    for (shape, dtype), idx in groups.items():
        cfg = make_cfg(shape, dtype)
        finder = build_finder(cfg.model, cfg.pipeline, resolve_device(device))
        data = [frames[i].data for i in idx]
        run_sequential(cfg, data[:cfg.pipeline.batch_size], finder=finder)  # warm-up
        t = time.perf_counter()
        got = run_sequential(cfg, data, finder=finder)
        seconds += time.perf_counter() - t
        for i, g in zip(idx, got):
            found[i] = g
    return found, seconds / max(len(frames), 1)


# ------------------------------------------------------------------------------------------------
# OM's peakfinder8, through files
# ------------------------------------------------------------------------------------------------

def om_grid(grid: Optional[dict[str, list]] = None) -> list[dict[str, Any]]:
    """Every combination of the grid's values (OM parameter dicts)."""
    g = grid or OM_GRID
    keys = list(g)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(g[k] for k in keys))]


def om_peaks(family: Family, grid: list[dict[str, Any]], om_python: Path = OM_PYTHON,
             timeout: float = 600.0) -> list[dict[str, Any]]:
    """Runs tools/om_runner.py in OM's venv on the family's frames for every parameter set.
    Returns per set {"params", "seconds_per_frame", "found": [PeakList per frame]}."""
    if not Path(om_python).is_file():
        raise FileNotFoundError(f"{om_python}: OM's venv is missing; build it with `make .venv-om`")
    with tempfile.TemporaryDirectory(prefix="om-eval-") as tmp:
        src, params, dst = Path(tmp, "frames.npz"), Path(tmp, "params.json"), Path(tmp, "peaks.json")
        arrays: dict[str, np.ndarray] = {"n": np.asarray(len(family.frames))}
        for i, f in enumerate(family.frames):
            arrays[f"frame_{i}"] = np.asarray(f.data, np.float32)
            arrays[f"bad_{i}"] = np.asarray(family.bad[i], np.uint8)
            arrays[f"radius_{i}"] = np.asarray(family.radius[i], np.float32)
        np.savez(src, **arrays)
        params.write_text(json.dumps(grid))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        proc = subprocess.run([str(om_python), str(REPO / "tools" / "om_runner.py"), str(src), str(params), str(dst)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"om_runner failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        out = json.loads(dst.read_text())
    return [{"params": r["params"], "seconds_per_frame": r["seconds_per_frame"],
             "found": [PeakList.from_columns(c) for c in r["frames"]]} for r in out["results"]]


def tune_om(val: Family, grid: list[dict[str, Any]], om_python: Path = OM_PYTHON) -> tuple[dict[str, Any], list]:
    """The parameter set with the best validation score, and every set's score."""
    runs = om_peaks(val, grid, om_python)
    table = [(tuning_score(score(r["found"], val.frames)), r["params"]) for r in runs]
    best = max(table, key=lambda t: t[0])
    return best[1], [{"score": round(s, 4), **p} for s, p in table]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Precision/recall/F1/position error of peak finders on simulated frames.")
    ap.add_argument("--families", default="lattice,heldout-jungfrau-diffuse",
                    help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--frames", type=int, default=16, help="evaluation frames per family")
    ap.add_argument("--val-frames", type=int, default=6, help="validation frames per family (OM's tuning)")
    ap.add_argument("--seed", type=int, default=12345, help="evaluation frames (training never uses it)")
    ap.add_argument("--val-seed", type=int, default=777, help="validation frames (tuning)")
    ap.add_argument("--detector", default="epix10k2m", help="bragg family: a preset or P,H,W")
    ap.add_argument("--finders", default="peaknet-atto,peaknet-small,classical,om",
                    help="comma list of peaknet-atto, peaknet-small, peaknet (--preset/--checkpoint), classical, om")
    ap.add_argument("--weights", action="append", default=[], metavar="PRESET=PATH",
                    help="checkpoint of a PeakNet preset (default: daemon/weights/<preset>.safetensors)")
    ap.add_argument("--preset", default="peaknet-atto", help="the 'peaknet' finder's preset")
    ap.add_argument("--checkpoint", default="default", help="the 'peaknet' finder's weights ('default' = shipped)")
    ap.add_argument("--threshold", type=float, default=None, help="PeakNet probability threshold (all PeakNets)")
    ap.add_argument("--min-pixels", type=int, default=None, help="PeakNet pipeline.min_pixels (all PeakNets)")
    ap.add_argument("--classical", action="append", default=[], metavar="KEY=VALUE",
                    help="ClassicalConfig override, e.g. snr_threshold=4.5 (repeatable)")
    ap.add_argument("--om-python", type=Path, default=OM_PYTHON, help="python of OM's venv (make .venv-om)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--hit-threshold", type=int, default=10, help="peaks that make a hit")
    ap.add_argument("--radius", type=float, default=1.5, help="match radius, px")
    ap.add_argument("--json", type=Path, default=None, help="write the full results here")
    return ap.parse_args(argv)


def _kv(items: list[str], what: str) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} expects KEY=VALUE, got {item!r}")
        out[k.strip()] = yaml.safe_load(v) if what == "--classical" else v.strip()
    return out


def peaknet_spec(name: str, args: argparse.Namespace, weights: dict[str, str]) -> Optional[dict[str, Any]]:
    """preset, checkpoint and operating point of a PeakNet finder; None when it has no weights."""
    preset = args.preset if name == "peaknet" else name
    ckpt = args.checkpoint if name == "peaknet" else weights.get(name)
    if ckpt is None:
        path = WEIGHTS / f"{preset}.safetensors"
        if not path.is_file():
            return None
        ckpt = "default" if preset == "peaknet-atto" else str(path)
    path = WEIGHTS / "peaknet-atto.safetensors" if ckpt == "default" else Path(ckpt)
    rec = recommended(path)
    return {"preset": preset, "checkpoint": ckpt,
            "threshold": args.threshold if args.threshold is not None else rec.get("threshold"),
            "min_pixels": args.min_pixels if args.min_pixels is not None else rec.get("min_pixels")}


def evaluate_family(fam: Family, val: Optional[Family], finders: list[str], args: argparse.Namespace,
                    device: str) -> dict[str, Any]:
    """Every finder on one family: the summary per finder (or why it was skipped)."""
    out: dict[str, Any] = {}
    weights = _kv(args.weights, "--weights")
    for name in finders:
        t0 = time.perf_counter()
        if name == "om":
            try:
                best, table = tune_om(val, om_grid(), args.om_python)
                run = om_peaks(fam, [best], args.om_python)[0]
            except (FileNotFoundError, RuntimeError) as exc:
                out[name] = {"skipped": str(exc)}
                print(f"[{fam.name}] om skipped: {exc}", flush=True)
                continue
            s = score(run["found"], fam.frames, args.radius, args.hit_threshold)
            s.update(seconds_per_frame=run["seconds_per_frame"], params=best, tuning=table)
        elif name == "classical":
            classical = _kv(args.classical, "--classical")
            found, spf = run_daemon_finder(fam.frames, lambda sh, dt: daemon_finder_config(
                "classical", sh, dt, device, classical=classical), device)
            s = score(found, fam.frames, args.radius, args.hit_threshold)
            s.update(seconds_per_frame=spf, params={"classical": classical or "defaults"})
        elif name.startswith("peaknet"):
            spec = peaknet_spec(name, args, weights)
            if spec is None:
                why = f"no weights for {name} (daemon/weights/{name}.safetensors; pass --weights {name}=PATH)"
                out[name] = {"skipped": why}
                print(f"[{fam.name}] {name} skipped: {why}", flush=True)
                continue
            found, spf = run_daemon_finder(fam.frames, lambda sh, dt: daemon_finder_config(
                "peaknet", sh, dt, device, spec["preset"], spec["checkpoint"], spec["threshold"],
                spec["min_pixels"]), device)
            s = score(found, fam.frames, args.radius, args.hit_threshold)
            s.update(seconds_per_frame=spf, params=spec)
        else:
            raise SystemExit(f"unknown finder {name!r}")
        s["wall_s"] = round(time.perf_counter() - t0, 2)
        out[name] = s
        print(f"[{fam.name}] {name}: F1 >=3 {s['cumulative']['>=3']['f1']:.3f}, "
              f"{1000 * s['seconds_per_frame']:.1f} ms/frame ({s['wall_s']} s)", flush=True)
    return out


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: per family and finder, F1 per SNR bin, precision, recall, RMS, ms/frame."""
    bins = ("2-3", "3-5", "5-10", ">=10")
    head = ("| family | finder | " + " | ".join(f"F1 {b}" for b in bins) +
            " | P / R (SNR >= 2) | RMS px SNR >= 5 | ms/frame |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for fam, res in results.items():
        for name, s in res.items():
            if "skipped" in s:
                lines.append(f"| {fam} | {name} | skipped: {s['skipped']} |")
                continue
            f1 = " | ".join(f"{s['bins'][b]['f1']:.3f}" for b in bins)
            c2, c5 = s["cumulative"][">=2"], s["cumulative"][">=5"]
            lines.append(f"| {fam} | {name} | {f1} | {c2['precision']:.3f} / {c2['recall']:.3f} | "
                         f"{c5['rms_px']:.3f} | {1000 * s['seconds_per_frame']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = str(resolve_device(args.device))
    finders = [k.strip() for k in args.finders.split(",") if k.strip()]
    from peaknet_daemon.evaluation import format_table

    results: dict[str, Any] = {}
    for name in [f.strip() for f in args.families.split(",") if f.strip()]:
        if name not in FAMILIES:
            raise SystemExit(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
        t = time.perf_counter()
        fam = make_family(name, args.frames, args.seed, args.detector)
        val = make_family(name, args.val_frames, args.val_seed, args.detector) if "om" in finders else None
        n_true = sum(len(f.peaks["y"]) for f in fam.frames)
        print(f"[{name}] {len(fam.frames)} frames {fam.frames[0].data.shape}, {n_true} true peaks, seed {args.seed} "
              f"(simulated in {time.perf_counter() - t:.1f} s), device {device}", flush=True)
        results[name] = evaluate_family(fam, val, finders, args, device)
        print(format_table({k: v for k, v in results[name].items() if "skipped" not in v}), flush=True)
    print(summary_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"frames": args.frames, "val_frames": args.val_frames, "seed": args.seed,
                                         "val_seed": args.val_seed, "device": device, "radius": args.radius,
                                         "results": results}, indent=1, default=_jsonable))
    return 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
