"""tools/ideal_bound.py: the simulators report every true peak to an observer without changing a
frame, and the bound behaves as a matched filter's must."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from peaknet_daemon.evaluation import heldout_frames
from peaknet_producers.diffraction import HELDOUT_FAMILY, family_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import ideal_bound  # noqa: E402

SHAPE = (2, 64, 64)


def test_the_observer_sees_every_true_peak_and_changes_no_frame():
    seen = ideal_bound.PeakStats()
    watched = heldout_frames(SHAPE, 3, seed=5, on_peak=seen)
    plain = heldout_frames(SHAPE, 3, seed=5)
    for a, b in zip(watched, plain):
        np.testing.assert_array_equal(a.data, b.data)
    truth = np.concatenate([f.peaks["snr"] for f in plain])
    np.testing.assert_allclose(seen.snr, truth)
    # the matched filter's mean is the peak's SNR times the root of its shape's energy (> 1 px)
    assert all(m > s for m, s in zip(seen.mean, seen.snr))

    seen = ideal_bound.PeakStats()
    frames = family_frames(HELDOUT_FAMILY, 2, seed=1, shape=(1, 64, 128), on_peak=seen).frames
    assert len(seen.snr) == sum(len(f.peaks["snr"]) for f in frames)


def test_the_bound_is_certain_for_bright_peaks_and_tightens_with_precision():
    stats = ideal_bound.PeakStats()
    stats.snr, stats.mean, stats.spread = [4.0, 4.0, 50.0, 50.0], [0.0, 0.0, 60.0, 60.0], [1.0] * 4
    maxima = ideal_bound.scan_maxima((1, 64, 64), frames=4, seed=1)
    assert np.all(np.diff(maxima) <= 0)
    rows = ideal_bound.bound(stats, frames=1, maxima=maxima, noise_frames=4, precisions=(0.5, 0.99))
    loose, strict = rows
    assert strict["threshold"] > loose["threshold"] > 2.0  # fewer false maxima allowed: a higher threshold
    assert strict["bins"][">=10"]["recall"] == 1.0
    assert strict["bins"]["3-5"]["recall"] < 0.01  # nothing above the noise: found by chance only
    assert strict["bins"]["3-5"]["f1"] < loose["bins"]["3-5"]["f1"] + 1e-12
