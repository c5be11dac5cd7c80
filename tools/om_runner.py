#!/usr/bin/env python3
"""Runs OnDA Monitor's peakfinder8 on frames from a file; writes the peaks to a JSON file.

Executed by the OM venv's python (`make .venv-om`), never imported by the daemon: OM 23.8.3
needs numpy < 2 and the daemon's venv has numpy 2. tools/evaluate.py writes the input and reads
the output (`om_peaks` there); this script imports only numpy and om.

Input (.npz): frame_<i> (P, H, W), bad_<i> (P, H, W; nonzero = bad, what a beamline gives OM as
its bad-pixel map), radius_<i> (P, H, W; pixel distance from the beam). Parameters (.json): a
list of OM `crystallography` parameter dicts (adc_threshold, minimum_snr, min_pixel_count,
max_pixel_count, local_bg_radius, ...). Each frame becomes OM's slab: its panels stacked along
the slow axis, one panel per ASIC, so no peak spans two panels.

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
    for data, bad, radius in zip(frames, bads, radii):
        p, h, w = data.shape
        finder = Peakfinder8PeakDetection(
            radius_pixel_map=radius.reshape(p * h, w).astype(np.float32),
            layout_info={"asic_nx": w, "asic_ny": h, "nasics_x": 1, "nasics_y": p},
            crystallography_parameters={**DEFAULTS, **params})
        finder.set_bad_pixel_map((bad.reshape(p * h, w) == 0).astype(np.int8))
        slab = data.reshape(p * h, w)
        t = time.perf_counter()
        found = finder.find_peaks(data=slab)
        seconds += time.perf_counter() - t
        ss = np.asarray(found["ss"], np.float64)
        panel = np.floor((ss + 0.5) / h).clip(0, p - 1).astype(int)
        out.append({"panel": panel.tolist(), "y": (ss - panel * h).tolist(), "x": list(found["fs"]),
                    "intensity": list(found["intensity"])})
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
