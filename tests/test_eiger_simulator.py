"""EIGER Stream V1 from a real external producer: ALBA's `eiger-simulator` (SIMPLON REST API plus
the ZMQ stream) serves an EIGER-style HDF5 master/data file pair with bitshuffle-LZ4 chunks and
planted peaks; the daemon (one CPU actor, `format: eiger-v1`) must find exactly those peaks.

The simulator is configured, initialised, armed and triggered over its REST API as a beamline
control system would. Everything waits on a condition with a deadline: the REST port answering,
the daemon logging the series' start, results arriving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest

from harness import SMALL_SHAPE, Daemon, Results, free_port, small_config

pytest.importorskip("eigersim")  # test extra (pyproject.toml); make test installs it
hdf5plugin = pytest.importorskip("hdf5plugin")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

P, H, W = SMALL_SHAPE
N_IMAGES = 6
GAP_ROW = H + 30  # a module-gap row the EIGER fills with 65535 (panel 1, row 30)
MASKED = [(10, 10), (H + 50, 40)]  # 2x2 clusters of masked pixels (65535), peak-like if kept
API = "1.6.0"
ENERGY_EV, DISTANCE_M, BEAM_X, BEAM_Y = 12000.0, 0.2, 31.5, 64.5


def plant(seed: int = 3) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """N_IMAGES uint16 images of (P*H, W): Poisson background, Gaussian peaks at known pixel
    centres (away from panel edges), one gap row and two 2x2 clusters of 65535 (what an EIGER
    writes into masked pixels); frame 2 has no peaks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:P * H, 0:W]
    images, truth = [], []
    for i in range(N_IMAGES):
        img = rng.poisson(3.0, (P * H, W)).astype(np.float64)
        peaks: list[tuple[int, int]] = []
        n = 0 if i == 2 else int(rng.integers(3, 6))
        while len(peaks) < n:
            panel, y, x = int(rng.integers(0, P)), int(rng.integers(6, H - 6)), int(rng.integers(6, W - 6))
            row = panel * H + y
            if abs(row - GAP_ROW) < 6 or any(abs(row - r) + abs(x - c) < 12 for r, c in peaks + MASKED):
                continue
            peaks.append((row, x))
            img += 600.0 * np.exp(-((yy - row) ** 2 + (xx - x) ** 2) / (2 * 1.0 ** 2))
        img = np.round(img).astype(np.uint16)
        img[GAP_ROW] = 65535
        for r, c in MASKED:
            img[r:r + 2, c:c + 2] = 65535
        images.append(img)
        truth.append(peaks)
    return np.stack(images), truth


def write_master(tmp: Path, images: np.ndarray) -> Path:
    """An EIGER-style pair: `x_master.h5` with /entry/data/data_000001 linking to
    `x_data_000001.h5`:/entry/data/data, one bitshuffle-LZ4 chunk per image."""
    data = tmp / "series_data_000001.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("entry/data/data", data=images, chunks=(1, *images.shape[1:]),
                         **hdf5plugin.Bitshuffle(cname="lz4"))
    master = tmp / "series_master.h5"
    with h5py.File(master, "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink(data.name, "/entry/data/data")
        det = f.create_group("entry/instrument/detector")
        det["beam_center_x"], det["beam_center_y"] = BEAM_X, BEAM_Y
        det["detector_distance"] = DISTANCE_M
        det["detectorSpecific/x_pixels_in_detector"] = W
        det["detectorSpecific/y_pixels_in_detector"] = P * H
        f["entry/instrument/beam/incident_wavelength"] = 12398.4198 / ENERGY_EV
    with h5py.File(master, "r") as f:  # the link and the filter work before the simulator reads it
        assert np.array_equal(f["entry/data/data_000001"][:], images)
    return master


class Simulator:
    """`eiger-simulator` in a subprocess and its SIMPLON REST API."""

    def __init__(self, master: Path, rest_port: int, zmq_port: int, log: Path):
        self.base = f"http://127.0.0.1:{rest_port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eigersim.server", "--host", "127.0.0.1", "--port", str(rest_port),
             "--zmq", f"tcp://127.0.0.1:{zmq_port}", "--dataset", str(master), "--log-level", "info",
             "--default-compression", "bslz4"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=master.parent)
        self.log_path = log

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"simulator exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                assert self.get("/detector/api/version/")["value"] == API
                return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"simulator REST API not up:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.1)  # polling another process's port: nothing to wait on

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.loads(r.read())

    def put(self, path: str, value=None, timeout: float = 60):
        body = b"" if value is None else json.dumps({"value": value}).encode()
        req = urllib.request.Request(self.base + path, data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def test_daemon_finds_the_planted_peaks_in_the_eiger_simulators_stream(tmp_path):
    images, truth = plant()
    master = write_master(tmp_path, images)
    rest_port, zmq_port, in_res, met = free_port(), free_port(), free_port(), free_port()
    sim = Simulator(master, rest_port, zmq_port, tmp_path / "simulator.log")
    results = Results(in_res)
    cfg = small_config(tmp_path, zmq_port, in_res, met, gpus={"cpu_fallback": True, "cpu_actors": 1})
    cfg["ingest"]["sockets"][0]["format"] = "eiger-v1"  # connect mode: the detector binds
    daemon = Daemon(cfg, tmp_path)
    try:
        sim.wait_up()
        det = f"/detector/api/{API}"
        for key, value in (("x_pixels_in_detector", W), ("y_pixels_in_detector", P * H),
                           ("nimages", N_IMAGES), ("ntrigger", 1), ("count_time", 0.02),
                           ("frame_time", 0.02), ("photon_energy", ENERGY_EV),
                           ("detector_distance", DISTANCE_M), ("beam_center_x", BEAM_X),
                           ("beam_center_y", BEAM_Y), ("compression", "bslz4")):
            sim.put(f"{det}/config/{key}", value)
        sim.put(f"/stream/api/{API}/config/header_detail", "all")
        assert sim.get(f"/stream/api/{API}/config/mode")["value"] == "enabled"
        sim.put(f"{det}/command/initialize")  # reads the HDF5 files, binds the stream socket
        assert sim.get(f"{det}/status/state")["value"] == "ready"
        daemon.wait_ready()

        # The simulator drops what its PUSH socket cannot send within 0.5 s, so arm until the
        # daemon has taken a series header (each arm is a new series).
        deadline, series = time.monotonic() + 90, None
        while series is None:
            armed = sim.put(f"{det}/command/arm")["sequence id"]
            try:
                daemon.wait_event("run_start", timeout=5, where=lambda e: e.get("run") == armed)
                series = armed
            except AssertionError:
                assert time.monotonic() < deadline, f"no series header reached the daemon:\n{daemon.tail()}"
        sim.put(f"{det}/command/trigger", timeout=120)  # returns when every image is sent

        got = results.wait_count(N_IMAGES, timeout=120, where=lambda r: r["run"] == series)
        assert sorted(r["seq"] for r in got) == list(range(N_IMAGES)), daemon.tail()
        done = daemon.wait_event("run_complete", where=lambda e: e["run"] == series)
        assert (done["count"], done["processed"], done["missing"]) == (N_IMAGES, N_IMAGES, 0)
        m = daemon.metrics()
        assert not any(k.startswith("peaknet_frames_rejected_total") and v for k, v in m.items()), m

        for r in got:
            planted = truth[r["seq"]]
            pk = r["peaks"]
            found = [(p * H + y, x) for p, y, x in zip(pk["panel"], pk["y"], pk["x"])]
            assert r["n_peaks"] == len(planted), (r["seq"], found, planted)
            for row, x in planted:
                assert min(abs(row - fr) + abs(x - fx) for fr, fx in found) < 1.5, (r["seq"], found, planted)
            assert all(abs(fr - GAP_ROW) > 3 for fr, _ in found)  # masked pixels are no peaks
            assert all(abs(fr - r) + abs(fx - c) > 4 for fr, fx in found for r, c in MASKED)
            meta = r["meta"]
            assert meta["photon_energy_ev"] == pytest.approx(ENERGY_EV)
            assert meta["detector_distance_mm"] == pytest.approx(DISTANCE_M * 1e3)
            assert (meta["beam_center_x_px"], meta["beam_center_y_px"]) == (BEAM_X, BEAM_Y)
            assert r["source"] == f"tcp://127.0.0.1:{zmq_port}"
    finally:
        rc = daemon.terminate()
        results.close()
        sim.close()
    assert rc == 0, daemon.tail()
