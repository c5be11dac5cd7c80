"""The Bragg simulator: determinism, truth geometry, the SNR definition, exact Poisson noise."""

import math
import time

import numpy as np
import pytest

from peaknet_producers.bragg import (DETECTORS, EDGE_PX, BraggConfig, BraggSimulator, bragg_items)
from peaknet_producers.poisson import PoissonMap

SMALL = dict(shape=(4, 64, 96))


def test_deterministic_per_seed_and_seq():
    a, b = BraggSimulator(BraggConfig(**SMALL), seed=3), BraggSimulator(BraggConfig(**SMALL), seed=3)
    f1, f2 = a.simulate(5), b.simulate(5)
    assert np.array_equal(f1.data, f2.data) and np.array_equal(f1.peaks["y"], f2.peaks["y"])
    assert not np.array_equal(a.simulate(6).data, f1.data)
    assert not np.array_equal(BraggSimulator(BraggConfig(**SMALL), seed=4).simulate(5).data, f1.data)


def test_peak_geometry_and_counts():
    cfg = BraggConfig(shape=(2, 80, 80), hit_fraction=1.0, peaks_per_frame=(5, 25))
    sim = BraggSimulator(cfg, seed=1)
    p, h, w = cfg.shape
    for seq in range(10):
        f = sim.simulate(seq)
        n = len(f.peaks["panel"])
        assert 5 <= n <= 25 and f.meta["n_peaks"] == n and f.meta["hit"]
        assert all(len(v) == n for v in f.peaks.values())
        pk = f.peaks
        assert ((pk["panel"] >= 0) & (pk["panel"] < p)).all()
        assert (pk["y"] >= EDGE_PX).all() and (pk["y"] <= h - 1 - EDGE_PX).all()
        assert (pk["x"] >= EDGE_PX).all() and (pk["x"] <= w - 1 - EDGE_PX).all()
        assert not np.allclose(pk["y"], np.round(pk["y"]))  # sub-pixel
        for i in range(n):
            same = (pk["panel"] == pk["panel"][i]) & (np.arange(n) != i)
            d = np.hypot(pk["y"][same] - pk["y"][i], pk["x"][same] - pk["x"][i])
            assert (d >= 5).all()
            iy, ix = int(round(pk["y"][i])), int(round(pk["x"][i]))
            assert not sim.bad[pk["panel"][i], iy, ix]
            assert f.mask[pk["panel"][i], iy, ix]  # the centre pixel is labelled
        assert f.data.dtype == np.uint16 and f.data.shape == cfg.shape
        assert (pk["snr"] >= 3.0).all() and (pk["snr"] <= 30.0).all()


def test_miss_frames_have_no_peaks_and_empty_mask():
    sim = BraggSimulator(BraggConfig(hit_fraction=0.0, **SMALL), seed=0)
    f = sim.simulate(0)
    assert len(f.peaks["panel"]) == 0 and not f.meta["hit"] and not f.mask.any()


def test_mask_only_near_true_peaks():
    sim = BraggSimulator(BraggConfig(hit_fraction=1.0, **SMALL), seed=2)
    f = sim.simulate(0)
    ps, ys, xs = np.nonzero(f.mask)
    pk = f.peaks
    for p, y, x in zip(ps, ys, xs):
        d = np.hypot(pk["y"] - y, pk["x"] - x)[pk["panel"] == p]
        assert d.min() <= 4 * 1.4 * math.sqrt(2)


def test_snr_and_intensity_follow_their_definitions():
    # Huge fixed SNR: the nearest pixel to each centre must read background + amplitude, where
    # amplitude * exp(-d^2 / 2 sigma^2) at that pixel, and the peak's max expected value is snr * sqrt(bg).
    cfg = BraggConfig(shape=(1, 128, 128), dtype="float32", hit_fraction=1.0, peaks_per_frame=(20, 20),
                      snr_range=(400.0, 400.0), sigma_px=(1.0, 1.0), background_photons=4.0,
                      water_ring=False, hot_pixels=0, dead_pixels=0)
    f = BraggSimulator(cfg, seed=5).simulate(0)
    pk = f.peaks
    assert np.allclose(pk["snr"], 400.0)
    for y, x, inten in zip(pk["y"], pk["x"], pk["intensity"]):
        iy, ix = int(round(y)), int(round(x))
        peak_max = 400.0 * 2.0  # snr * sqrt(4)
        measured = f.data[0, iy, ix] - 4.0
        assert abs(measured - peak_max) < 6 * math.sqrt(peak_max + 4.0)
        # Gaussian integral of a sigma=1 peak whose best pixel holds peak_max
        g0 = math.exp(-((iy - y) ** 2 + (ix - x) ** 2) / 2)
        assert inten == pytest.approx(peak_max / g0 * 2 * math.pi, rel=0.02)


def test_hot_and_dead_pixels_fixed_per_seed():
    sim = BraggSimulator(BraggConfig(hot_pixels=7, dead_pixels=5, **SMALL), seed=9)
    for seq in (0, 1):
        d = sim.simulate(seq).data
        assert (d[sim.hot] == 60000).all() and (d[sim.dead] == 0).all()
    assert len(sim.hot[0]) == 7 and len(sim.dead[0]) == 5


def test_float32_output_and_presets():
    f = BraggSimulator(BraggConfig(dtype="float32", **SMALL)).simulate(0)
    assert f.data.dtype == np.float32
    assert BraggConfig.for_detector("jungfrau4m").shape == DETECTORS["jungfrau4m"] == (8, 512, 1024)
    with pytest.raises(ValueError):
        BraggConfig(dtype="float64")
    with pytest.raises(ValueError):
        BraggConfig.for_detector("pilatus")


def test_epix_frame_is_fast():
    sim = BraggSimulator(BraggConfig.for_detector("epix10k2m"), seed=0)
    times = []
    for seq in range(5):
        t = time.perf_counter()
        sim.simulate(seq)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.1


def test_poisson_map_is_exact_poisson():
    lam = 2.0
    counts = PoissonMap(np.full((8, 256, 256), lam)).sample(np.random.default_rng(0)).ravel()
    n = counts.size
    pmf = [math.exp(-lam) * lam ** k / math.factorial(k) for k in range(14)]
    hist = np.bincount(counts, minlength=14)[:14]
    for k in range(10):  # every bin within 5 sigma of its binomial expectation
        assert abs(hist[k] - n * pmf[k]) < 5 * math.sqrt(n * pmf[k]) + 1
    tail = (counts >= 10).sum()  # the tail a 16-bit table alone would cut off
    expected_tail = n * (1 - sum(pmf[:10]))
    assert abs(tail - expected_tail) < 5 * math.sqrt(expected_tail) + 1


def test_bragg_items_pool_cycles_with_truth():
    sim = BraggSimulator(BraggConfig(hit_fraction=1.0, **SMALL), seed=0)
    items = bragg_items(sim, pool=2)
    got = [next(items) for _ in range(5)]
    assert got[4].data is got[0].data and got[3].truth is got[1].truth
    assert np.array_equal(got[1].data, sim.simulate(1).data)
