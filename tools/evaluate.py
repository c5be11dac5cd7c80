#!/usr/bin/env python3
"""Peak-finding accuracy of PeakNet and the classical finder on held-out simulated frames.

Frames come from the Bragg simulator with a seed that training never uses (training: 1 and
per-worker streams, validation: 777; here: 12345 by default). Each finder runs through the
daemon's own reference loop (`run_sequential`: the finder, then on-device peak extraction), so
the numbers are what the daemon would emit. Counting rules: `peaknet_daemon.evaluation`.

    python tools/evaluate.py --frames 20 --json eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from peaknet_daemon.config import config_from_dict
from peaknet_daemon.evaluation import format_table, heldout_frames, score_frames
from peaknet_daemon.pipeline import resolve_device, run_sequential


def finder_config(kind: str, shape: tuple[int, int, int], device: str, checkpoint: str,
                  threshold: Optional[float], preset: str, classical: dict[str, Any],
                  min_pixels: Optional[int] = None) -> Any:
    model: dict[str, Any] = {"preset": "classical", "classical": classical} if kind == "classical" else \
        {"preset": preset, "checkpoint": checkpoint}
    if threshold is not None and kind != "classical":
        model["threshold"] = threshold
    pipeline: dict[str, Any] = {"frame_shape": list(shape), "dtype": "uint16", "batch_size": 2, "device": device}
    if min_pixels is not None:
        pipeline["min_pixels"] = min_pixels
    return config_from_dict({"model": model, "pipeline": pipeline})


def evaluate_finder(cfg: Any, sims: list[Any], hit_threshold: int, radius: float) -> dict[str, Any]:
    t = time.perf_counter()
    found = run_sequential(cfg, [s.data for s in sims])
    elapsed = time.perf_counter() - t
    summary = score_frames(found, sims, radius=radius, hit_threshold=hit_threshold)
    summary["seconds"] = round(elapsed, 2)
    return summary


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Precision/recall/F1 of peak finders on simulated frames.")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12345, help="held out: training uses 1, validation 777")
    ap.add_argument("--detector", default="epix10k2m", help="epix10k2m | jungfrau4m | rayonix | P,H,W")
    ap.add_argument("--checkpoint", default="default", help="PeakNet weights ('default' = shipped)")
    ap.add_argument("--preset", default="peaknet-atto")
    ap.add_argument("--threshold", type=float, default=None, help="PeakNet probability threshold")
    ap.add_argument("--min-pixels", type=int, default=None, help="PeakNet pipeline.min_pixels")
    ap.add_argument("--finders", default="peaknet,classical", help="comma list of peaknet, classical")
    ap.add_argument("--classical", action="append", default=[], metavar="KEY=VALUE",
                    help="ClassicalConfig override, e.g. snr_threshold=4.5 (repeatable)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--snr", type=float, nargs=2, default=(2.0, 40.0), help="true SNR range (log-uniform)")
    ap.add_argument("--background", type=float, default=2.0, help="mean background photons per pixel")
    ap.add_argument("--hit-threshold", type=int, default=10, help="peaks that make a hit")
    ap.add_argument("--radius", type=float, default=1.5, help="match radius, px")
    ap.add_argument("--json", type=Path, default=None, help="write the full results here")
    return ap.parse_args(argv)


def detector_shape(spec: str) -> tuple[int, int, int]:
    from peaknet_producers.bragg import DETECTORS

    if spec in DETECTORS:
        return DETECTORS[spec]
    parts = [int(v) for v in spec.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise SystemExit(f"--detector: a name ({', '.join(DETECTORS)}) or P,H,W; got {spec!r}")
    return parts[0], parts[1], parts[2]


def _kv(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--classical expects KEY=VALUE, got {item!r}")
        out[k.strip()] = yaml.safe_load(v)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    shape = detector_shape(args.detector)
    device = str(resolve_device(args.device))
    sims = heldout_frames(shape, args.frames, args.seed, tuple(args.snr), args.background)
    results: dict[str, Any] = {}
    for kind in [k.strip() for k in args.finders.split(",") if k.strip()]:
        if kind not in ("peaknet", "classical"):
            raise SystemExit(f"unknown finder {kind!r}")
        cfg = finder_config(kind, shape, device, args.checkpoint, args.threshold, args.preset,
                            _kv(args.classical), args.min_pixels)
        name = args.preset if kind == "peaknet" else "classical"
        results[name] = evaluate_finder(cfg, sims, args.hit_threshold, args.radius)
        results[name]["model"] = {"preset": cfg.model.preset, "checkpoint": cfg.model.checkpoint,
                                  "threshold": cfg.model.threshold, "min_pixels": cfg.pipeline.min_pixels,
                                  "classical": vars(cfg.model.classical) if kind == "classical" else None}
    n_true = sum(len(s.peaks["y"]) for s in sims)
    print(f"{args.frames} frames {shape}, seed {args.seed}, {n_true} true peaks, SNR {args.snr[0]:g}..{args.snr[1]:g}, "
          f"match radius {args.radius} px, device {device}")
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"frames": args.frames, "seed": args.seed, "shape": list(shape),
                                         "snr": list(args.snr), "device": device, "results": results},
                                        indent=1, default=_jsonable))
    return 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
