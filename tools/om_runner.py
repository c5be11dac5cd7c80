#!/usr/bin/env python3
"""Runs OnDA Monitor's peakfinder8 on frames from a file; writes the peaks to a JSON file.

Executed by the OM venv's python (`make .venv-om`), never imported by the daemon: OM 23.8.3
needs numpy < 2 and the daemon's venv has numpy 2. tools/evaluate.py writes the input and reads
the output (`om_peaks` there); this script imports only numpy and om.

Input (.npz): frame_<i> (P, H, W), bad_<i> (P, H, W; nonzero = bad, what a beamline gives OM as
its bad-pixel map), radius_<i> (P, H, W; pixel distance from the beam). Parameters (.json): a
list of OM `crystallography` parameter dicts (adc_threshold, minimum_snr, min_pixel_count,
max_pixel_count, local_bg_radius, ...; per_panel, default true: one call per panel). A frame
becomes OM's slab: its panels stacked along the slow axis, one panel per ASIC, so no peak spans
two panels; with per_panel each panel is a slab of its own (see `run`).

Output (.json): for every parameter set, per frame the peaks (panel, y, x in the pixel-centre
convention, as OM's fs/ss are) and the seconds `find_peaks` took per frame.

    .venv-om/bin/python tools/om_runner.py frames.npz params.json peaks.json
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from om.algorithms.crystallography import Peakfinder8PeakDetection

DEFAULTS = {"max_num_peaks": 2048, "adc_threshold": 0.0, "minimum_snr": 6.0, "min_pixel_count": 2,
            "max_pixel_count": 40, "local_bg_radius": 4, "min_res": 0, "max_res": 100000,
            "bad_pixel_map_filename": None, "bad_pixel_map_hdf5_path": None}


def run(frames: list[np.ndarray], bads: list[np.ndarray], radii: list[np.ndarray],
        params: dict[str, Any]) -> dict[str, Any]:
    """peakfinder8 with one parameter set over all frames."""
    out: list[dict[str, list]] = []
    seconds = 0.0
    per_panel = bool(params.get("per_panel", True))
    om_params = {**DEFAULTS, **{k: v for k, v in params.items() if k != "per_panel"}}
    for data, bad, radius in zip(frames, bads, radii):
        p, h, w = data.shape
        # OM 23.8.3's peakfinder8 merges a peak on a later ASIC of the slab with one at the same
        # ASIC-local place on an earlier ASIC (found here; tests/test_evaluate_train.py), so by
        # default each panel is its own one-ASIC slab (radial statistics per panel then).
        parts = [(i, i + 1) for i in range(p)] if per_panel else [(0, p)]
        cols: dict[str, list] = {"panel": [], "y": [], "x": [], "intensity": []}
        for a, b in parts:
            n = b - a
            finder = Peakfinder8PeakDetection(
                radius_pixel_map=radius[a:b].reshape(n * h, w).astype(np.float32),
                layout_info={"asic_nx": w, "asic_ny": h, "nasics_x": 1, "nasics_y": n},
                crystallography_parameters=om_params)
            finder.set_bad_pixel_map((bad[a:b].reshape(n * h, w) == 0).astype(np.int8))
            slab = data[a:b].reshape(n * h, w)
            t = time.perf_counter()
            found = finder.find_peaks(data=slab)
            seconds += time.perf_counter() - t
            ss = np.asarray(found["ss"], np.float64)
            panel = np.floor((ss + 0.5) / h).clip(0, n - 1).astype(int)
            cols["panel"] += (panel + a).tolist()
            cols["y"] += (ss - panel * h).tolist()
            cols["x"] += list(found["fs"])
            cols["intensity"] += list(found["intensity"])
        out.append(cols)
    return {"params": params, "seconds_per_frame": seconds / max(len(frames), 1), "frames": out}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, params_path, dst = argv
    with np.load(src) as z:
        n = int(z["n"])
        frames = [z[f"frame_{i}"] for i in range(n)]
        bads = [z[f"bad_{i}"] for i in range(n)]
        radii = [z[f"radius_{i}"] for i in range(n)]
    with open(params_path) as fh:
        grid = json.load(fh)
    results = [run(frames, bads, radii, params) for params in grid]
    with open(dst, "w") as fh:
        json.dump({"om_version": __import__("om").__version__, "numpy": np.__version__, "results": results}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
