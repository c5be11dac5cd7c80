"""Headless Chromium for the monitor page: the rendered DOM and a screenshot, for the test
(tests/test_monitor_page.py) and the README picture (tools/demo.py --monitor-screenshot).

Chromium runs the page's JavaScript for `budget_ms` of virtual time (timers, polls and image
loads included), then dumps the DOM or takes the screenshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium-family browser, or None ($CHROMIUM wins)."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((p for p in map(shutil.which, NAMES) if p), None)


def _run(chromium: str, url: str, action: list[str], budget_ms: int, size: tuple[int, int],
         timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="peaknet-chromium-") as profile:
        cmd = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}",
               f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}", *action, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(chromium).name} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def dump_dom(chromium: str, url: str, budget_ms: int = 5000, size: tuple[int, int] = (1400, 1600),
             timeout: float = 90) -> str:
    """The page's DOM (serialised HTML) after `budget_ms` of virtual time."""
    return _run(chromium, url, ["--dump-dom"], budget_ms, size, timeout).stdout


def screenshot(chromium: str, url: str, out: Path, budget_ms: int = 5000, size: tuple[int, int] = (1400, 1600),
               timeout: float = 90) -> Path:
    """A PNG of the page after `budget_ms` of virtual time, written to `out`."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(chromium, url, [f"--screenshot={out}"], budget_ms, size, timeout)
    if not out.is_file():
        raise RuntimeError(f"no screenshot written to {out}")
    return out
