"""Drop the ray libraries the daemon never imports (rllib, data, serve, tune, train, llm) and
the dashboard's web client from
the ray wheel in .whl/, so the working tree plus wheels fit the GPU machine's 64 MiB carry.

    ../shared/tools/device-wheels && python3 tools/trim_ray_wheel.py
"""

from __future__ import annotations

import glob
import os
import sys
import zipfile

# The dashboard's web client too: the daemon starts Ray without the dashboard.
DROP = tuple(f"ray/{name}/" for name in ("rllib", "data", "serve", "tune", "train", "llm", "dashboard/client/build"))


def trim(wheel: str) -> int:
    """Rewrite `wheel` without the DROP folders (RECORD updated); returns the entries dropped."""
    dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if info.filename.startswith(DROP):
                dropped += 1
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True) if not line.decode().startswith(DROP))
            out.writestr(info, data)
    os.replace(wheel + ".tmp", wheel)
    return dropped


if __name__ == "__main__":
    wheels = glob.glob(os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".whl", "ray-*.whl"))
    if not wheels:
        sys.exit("trim_ray_wheel: no ray wheel in .whl/ (run ../shared/tools/device-wheels first)")
    for w in wheels:
        print(f"{w}: dropped {trim(w)} entries, now {os.path.getsize(w) / 2**20:.1f} MiB")
