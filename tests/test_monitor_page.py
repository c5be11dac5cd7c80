"""The live page end to end: the daemon on the CPU (embedded Ray, two CPU actors, the classical
finder on the bundled sample run's epix10k2M frames) with the monitor on, the run replayed with
`peaknet-producer replay`, results read from the results stream, and /monitor/ rendered by
headless Chromium: the page must report the hits the results stream reported and draw at least
one latest hit; a screenshot lands in the test's output folder (tmp_path/monitor.png).

Skips only where no Chromium is installed (`.ci/run` installs Debian's `chromium`).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import Daemon, Results, free_port, producer, small_config
from peaknet_producers.sample import FRAMES, SAMPLE_RUN

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from browser import dump_dom, find_chromium, screenshot  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
EPIX = [16, 352, 384]


class PageFacts(HTMLParser):
    """Text of elements by id, and the hit canvases' data-drawn values."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, str] = {}
        self.drawn: list[int] = []
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "canvas" and "hit" in (attrs.get("class") or "").split():
            self.drawn.append(int(attrs.get("data-drawn") or 0))
        if tag not in ("br", "img", "input", "meta", "link", "canvas"):
            self._open.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag not in ("br", "img", "input", "meta", "link", "canvas") and self._open:
            self._open.pop()

    def handle_data(self, data):
        if self._open and self._open[-1]:
            self.text[self._open[-1]] = self.text.get(self._open[-1], "") + data


def monitor_state(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/monitor/state.json", timeout=5) as r:
        return json.loads(r.read())


def wait_state(port: int, done, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not done(state := monitor_state(port)):
        assert time.monotonic() < deadline, state["totals"]
        time.sleep(0.2)  # polling another process's HTTP endpoint: no event to wait on
    return state


def test_monitor_page_shows_the_replayed_run(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found (install Debian's `chromium`, as .ci/run does, or set $CHROMIUM)")
    in_port, res_port, met_port = free_port(), free_port(), free_port()
    results = Results(res_port)
    cfg = small_config(tmp_path, in_port, res_port, met_port,
                       pipeline={"frame_shape": EPIX, "batch_size": 2},
                       output={"cxi_dir": "", "hit_threshold": 10},
                       monitor={"enabled": True, "max_hits_per_s": 5, "latest_hits": 4})
    cfg["ingest"]["sockets"][0]["max_message_bytes"] = 16 << 20
    daemon = Daemon(cfg, tmp_path)
    try:
        daemon.wait_ready()
        ready = daemon.wait_event("monitor_serving")
        assert ready["url"] == f"http://127.0.0.1:{met_port}/monitor/"
        replay = producer("replay", str(SAMPLE_RUN), "--endpoint", f"tcp://127.0.0.1:{in_port}", "--bind",
                          "--no-progress")
        got = results.wait_count(FRAMES, timeout=240)
        assert replay.wait(timeout=60) == 0, replay.stderr.read()
        assert len(got) == FRAMES
        hits = sum(r["hit"] for r in got)
        assert 0 < hits < FRAMES  # the sample run has hits and misses

        state = wait_state(met_port, lambda s: s["totals"]["frames"] >= FRAMES)
        (run,) = state["runs"]
        assert (run["frames"], run["hits"], run["peaks"]) == (FRAMES, hits, sum(r["n_peaks"] for r in got))
        assert sum(state["histogram"]["counts"]) == FRAMES
        assert state["powder"]["peaks"] == run["peaks"] and state["totals"]["bad_peaks"] == 0
        assert 1 <= len(state["hits"]) <= 4
        by_seq = {r["seq"]: r for r in got}
        for h in state["hits"]:
            assert by_seq[h["seq"]]["hit"] and h["n_peaks"] == by_seq[h["seq"]]["n_peaks"] == len(h["rows"])
        assert {r["worker"] for r in got} <= {a["name"] for a in state["actors"]} and len(state["actors"]) == 2
        assert sum(a["received"] for a in state["actors"]) == FRAMES

        url = f"http://127.0.0.1:{met_port}/monitor"  # the redirect to /monitor/ is followed
        page = PageFacts()
        page.feed(dump_dom(chromium, url))
        assert page.text.get("run-hits") == str(hits), page.text
        assert page.text.get("run-frames") == str(FRAMES)
        assert page.text.get("run-id") == str(run["run"])
        assert len(page.drawn) == len(state["hits"]), page.drawn
        assert max(page.drawn) > 1000, f"no latest-hit image drawn: lit pixels per canvas {page.drawn}"

        shot = screenshot(chromium, url, tmp_path / "monitor.png")
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000
    finally:
        rc = daemon.terminate()
        results.close()
    assert rc == 0, daemon.tail()
