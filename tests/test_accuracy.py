"""Accuracy of the shipped PeakNet checkpoint and the classical finder on held-out frames,
plus the counting rules of peaknet_daemon.evaluation that those figures rest on."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from peaknet_daemon.config import config_from_dict
from peaknet_daemon.evaluation import (AccuracyTally, PeakList, heldout_frames, match_peaks,
                                       score_frames)
from peaknet_daemon.model.checkpoint import DEFAULT_WEIGHTS
from peaknet_daemon.pipeline import run_sequential

SHAPE = (4, 352, 384)
FRAMES = 10
SEED = 12345  # held out: training uses 1 (and per-worker streams), validation 777


def _pl(yx, panel=None, snr=None) -> PeakList:
    yx = np.asarray(yx, float).reshape(-1, 2)
    panel = np.zeros(len(yx), int) if panel is None else np.asarray(panel)
    return PeakList(panel, yx[:, 0], yx[:, 1], None, None if snr is None else np.asarray(snr, float))


# ---------------------------------------------------------------------------------------------
# Counting rules
# ---------------------------------------------------------------------------------------------

def test_match_is_one_to_one_nearest_first():
    true = [[10.0, 10.0], [10.0, 12.0]]
    found = [[10.0, 11.2], [10.0, 10.1], [50.0, 50.0]]
    f, t = match_peaks(found, true, radius=1.5)
    pairs = dict(zip(f.tolist(), t.tolist()))
    # (1 -> 0) is nearest (0.1 px) and taken first; found 0 then takes the remaining true 1.
    assert pairs == {1: 0, 0: 1}
    # Two found peaks on one true peak: only one of them matches.
    f, t = match_peaks([[5.0, 5.0], [5.0, 5.5]], [[5.0, 5.2]], radius=1.5)
    assert len(f) == 1 and f[0] == 0 and t[0] == 0


def test_match_respects_radius_and_empty_inputs():
    f, t = match_peaks([[0.0, 0.0]], [[0.0, 1.6]], radius=1.5)
    assert len(f) == 0 and len(t) == 0
    f, t = match_peaks(np.zeros((0, 2)), [[1.0, 1.0]])
    assert len(f) == 0


def test_tally_bins_attribution_and_hits():
    tally = AccuracyTally(hit_threshold=2)
    truth = _pl([[10, 10], [40, 40], [80, 80]], panel=[0, 0, 1], snr=[2.5, 6.0, 20.0])
    # panel 0: (10,10) missed but a found peak 3 px away is charged to its 2-3 bin;
    # (40,40) found; panel 1: (80,80) found on panel 1 only; a far-away spurious peak on panel 1.
    found = _pl([[13, 10], [40.5, 40], [80, 80.5], [200, 200], [80, 80]], panel=[0, 0, 1, 1, 0])
    tally.add(found, truth, true_hit=True)
    s = tally.summary()
    assert s["bins"]["2-3"]["tp"] == 0 and s["bins"]["2-3"]["fn"] == 1
    assert s["bins"]["5-10"]["tp"] == 1 and s["bins"][">=10"]["tp"] == 1
    # found (80,80) on panel 0 is spurious (no true peak within 4 px on its own panel), as is (200,200)
    assert s["spurious"] == 2
    assert s["overall"]["fp"] == 3 and s["overall"]["tp"] == 2
    assert s["overall"]["precision"] == pytest.approx(2 / 5)
    # the bins' TP + FP add up to the found peaks
    assert sum(b["tp"] + b["fp"] for b in s["bins"].values()) == pytest.approx(5)
    assert s["hits"]["tp"] == 1
    tally.add(_pl([[1, 1], [5, 5]]), _pl(np.zeros((0, 2)), snr=[]), true_hit=False)
    assert tally.summary()["hits"]["fp"] == 1 and tally.summary()["hits"]["precision"] == 0.5


# ---------------------------------------------------------------------------------------------
# The finders on held-out simulated frames
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frames():
    return heldout_frames(SHAPE, FRAMES, SEED)


def _score(model: dict, frames, **pipeline) -> dict:
    cfg = config_from_dict({"model": model, "pipeline": {
        "frame_shape": list(SHAPE), "dtype": "uint16", "batch_size": 2, "device": "cpu", **pipeline}})
    found = run_sequential(cfg, [f.data for f in frames])
    return score_frames(found, frames)


@pytest.fixture(scope="module")
def classical(frames):
    return _score({"preset": "classical"}, frames)


def test_heldout_frames_are_realistic(frames):
    n = [len(f.peaks["y"]) for f in frames]
    assert sum(n) > 100 and min(n) == 0  # hits and misses
    snr = np.concatenate([f.peaks["snr"] for f in frames])
    assert (snr >= 5).sum() > 50 and ((snr >= 3) & (snr < 5)).sum() > 10


def test_classical_finder_f1_at_snr5(classical):
    row = classical["cumulative"][">=5"]
    assert row["f1"] >= 0.90, classical
    assert classical["hits"]["recall"] >= 0.75


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped PeakNet weights not trained yet (tools/train.py)")
def test_peaknet_checkpoint_f1_at_snr5(frames, classical):
    # At the operating point its log names (what configs/*.yaml set; tools/evaluate.py reads it too).
    point = json.loads(DEFAULT_WEIGHTS.with_suffix(".train.json").read_text())["operating_point"]
    t = time.perf_counter()
    s = _score({"preset": "peaknet-atto", "checkpoint": "default", "threshold": point["threshold"]}, frames,
               min_pixels=point["min_pixels"])
    elapsed = time.perf_counter() - t
    assert s["cumulative"][">=5"]["f1"] >= 0.90, s
    # PeakNet is at least as good as the classical finder on the faint peaks (SNR 3..5).
    assert s["bins"]["3-5"]["f1"] >= classical["bins"]["3-5"]["f1"], (s["bins"], classical["bins"])
    assert s["hits"]["recall"] >= 0.9 and s["hits"]["precision"] >= 0.9
    assert elapsed < 50, f"{elapsed:.1f} s for {FRAMES} frames on the CPU"
