"""The diffraction simulator: Ewald-sphere geometry, detector traits, truth rules, the held-out family."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from peaknet_producers.diffraction import (HELDOUT_FAMILY, TRAIN_FAMILY, DiffractionConfig, DiffractionSimulator,
                                           ewald_reflections, family_frames, heldout_config, random_rotation,
                                           random_train_config, reciprocal_basis)

SMALL = dict(shape=(2, 96, 128), asic=(48, 64), detector_distance_mm=20.0, cell_a=(20.0, 40.0),
             reflection_photons=(2000.0, 2000.0), hit_fraction=1.0)


def test_reciprocal_basis_is_dual_to_the_cell():
    recip = reciprocal_basis(50.0, 60.0, 70.0, 80.0, 95.0, 110.0)
    al, be, ga = (math.radians(v) for v in (80.0, 95.0, 110.0))
    real = np.linalg.inv(recip.T).T  # rows a, b, c
    assert np.allclose(real @ recip, np.eye(3))  # a_i . a*_j = delta_ij
    assert np.allclose(np.linalg.norm(real, axis=1), [50.0, 60.0, 70.0])
    assert math.isclose(real[1] @ real[2] / (60 * 70), math.cos(al), abs_tol=1e-9)
    assert math.isclose(real[0] @ real[2] / (50 * 70), math.cos(be), abs_tol=1e-9)
    assert math.isclose(real[0] @ real[1] / (50 * 60), math.cos(ga), abs_tol=1e-9)
    rot = random_rotation(np.random.default_rng(3))
    assert np.allclose(rot @ rot.T, np.eye(3)) and math.isclose(np.linalg.det(rot), 1.0)


def test_ewald_reflections_are_on_the_sphere_and_complete():
    """Every returned point lies within the tolerance of the Ewald sphere, and a brute-force
    search over all Miller indices in range finds exactly the same set."""
    rng = np.random.default_rng(0)
    recip = random_rotation(rng) @ reciprocal_basis(23.0, 31.0, 37.0, 90.0, 100.0, 90.0)
    wavelength, s_max, tol = 1.3, 0.45, 2e-3
    hkl, err = ewald_reflections(recip, wavelength, s_max, tol)
    assert len(hkl) > 20
    k0 = np.array([0.0, 0.0, 1.0 / wavelength])
    q = hkl @ recip.T
    dist = np.linalg.norm(k0 + q, axis=1) - 1.0 / wavelength
    assert np.allclose(dist, err) and (np.abs(dist) <= tol).all()
    assert (np.linalg.norm(q, axis=1) <= s_max).all()
    n = 20  # |h| <= 37 * 0.45 < 17
    box = np.array(list(itertools.product(range(-n, n + 1), repeat=3)))
    qb = box @ recip.T
    on = (np.abs(np.linalg.norm(k0 + qb, axis=1) - 1 / wavelength) <= tol) & \
         (np.linalg.norm(qb, axis=1) <= s_max) & (np.abs(box).sum(1) > 0)
    assert {tuple(v) for v in box[on]} == {tuple(v) for v in hkl}


def test_spots_land_where_the_scattering_angle_says():
    """A reflection of resolution s = 1/d is drawn at the pixel whose 2-theta is 2 asin(s lambda / 2)."""
    sim = DiffractionSimulator(DiffractionConfig(**SMALL), seed=1)
    crystal = sim._crystal(np.random.default_rng(5))
    wl = sim.cfg.wavelength_a
    refl = sim.reflections(crystal, wl)
    assert len(refl["y"]) > 10
    g = sim.geom
    for p, y, x, s in zip(refl["panel"], refl["y"], refl["x"], refl["s"]):
        iy, ix = int(round(y)), int(round(x))
        # s at the nearest pixel centre differs from the spot's s by at most its change over ~0.7 px
        ds = abs(g.s[p, min(iy + 1, g.s.shape[1] - 1), ix] - g.s[p, iy, ix]) + \
            abs(g.s[p, iy, min(ix + 1, g.s.shape[2] - 1)] - g.s[p, iy, ix])
        assert abs(g.s[p, iy, ix] - s) <= ds + 1e-9


def test_frames_have_truth_ignore_hot_and_dead_pixels():
    cfg = DiffractionConfig(**SMALL, hot_pixels=3, dead_pixels=5, dtype="uint16", adu_per_photon=10.0)
    sim = DiffractionSimulator(cfg, seed=2)
    f = sim.simulate(0)
    assert f.data.dtype == np.uint16 and f.data.shape == cfg.shape
    assert sim.hot.sum() == 3 * 2 and sim.dead.sum() == 5 * 2 and not (sim.hot & sim.dead).any()
    assert (f.data[sim.dead] == 0).all()
    assert np.allclose(f.data[sim.hot], np.clip(np.rint(sim.hot_value * 10.0), 0, 65535))
    pk = f.peaks
    assert len(pk["y"]) > 5 and f.meta["hit"] and f.meta["n_peaks"] == len(pk["y"])
    assert (pk["snr"] >= cfg.label_snr).all()
    # centres on the panel, not on bad pixels, and labelled in the mask
    iy, ix = np.rint(pk["y"]).astype(int), np.rint(pk["x"]).astype(int)
    assert not sim.bad[pk["panel"], iy, ix].any() and f.mask[pk["panel"], iy, ix].all()
    # faint reflections are drawn but listed as ignored, not truth
    assert len(f.ignore["y"]) > 0 and (f.ignore["snr"] < cfg.label_snr).any()
    assert sim.simulate(0).data.tobytes() == f.data.tobytes()  # deterministic per (seed, seq)
    f32 = DiffractionSimulator(DiffractionConfig(**{**SMALL, "dtype": "float32"}), seed=2).simulate(0)
    assert f32.data.dtype == np.float32 and (f32.data < 0).any()  # readout noise below zero survives


def test_noise_draws_share_the_expectation_not_the_noise():
    sim = DiffractionSimulator(DiffractionConfig(**SMALL, dtype="float32"), seed=2)
    first, second, third = sim.simulate_draws(0, 3)
    assert first.data.tobytes() == sim.simulate(0).data.tobytes()  # the first draw is simulate()
    for other in (second, third):
        assert np.array_equal(other.peaks["y"], first.peaks["y"]) and np.array_equal(other.mask, first.mask)
        assert other.meta == first.meta and other.meta is not first.meta
        assert not np.array_equal(other.data, first.data)
    # the same expectation: the draws differ by noise alone, about sqrt(2) of one frame's spread
    diff = (second.data - first.data).astype(np.float64)
    assert abs(diff.mean()) < 0.05 * diff.std()


def test_placed_peaks_find_their_neighbours_as_a_full_search_does():
    from peaknet_producers.diffraction import _Placed

    rng = np.random.default_rng(0)
    placed, points = _Placed(3.0), []
    for panel, y, x in zip(rng.integers(0, 2, 3000), rng.uniform(0, 60, 3000), rng.uniform(0, 60, 3000)):
        full = any(q == panel and (qy - y) ** 2 + (qx - x) ** 2 < 9.0 for q, qy, qx in points)
        assert placed.near(int(panel), float(y), float(x)) == full
        if not full:
            placed.add(int(panel), float(y), float(x))
            points.append((panel, y, x))
    assert 50 < len(points) < 3000


def test_non_hits_have_no_peaks():
    f = DiffractionSimulator(DiffractionConfig(**{**SMALL, "hit_fraction": 0.0}), seed=0).simulate(3)
    assert not f.meta["hit"] and len(f.peaks["y"]) == 0 and not f.mask.any()


def test_gain_modes_quantise_bright_pixels():
    base = {**SMALL, "dtype": "float32", "readout_noise_photons": 0.0, "gain_error": 0.0, "hot_pixels": 0,
            "dead_pixels": 0}
    low = DiffractionSimulator(DiffractionConfig(**base, gain_mode="low"), seed=4).simulate(0).data
    assert np.allclose(low / 8.0, np.round(low / 8.0))  # low gain: steps of 8 photons
    auto = DiffractionSimulator(DiffractionConfig(**base, gain_mode="auto"), seed=4).simulate(0).data
    bright = auto > 40
    assert bright.any() and np.allclose(auto[bright] / 8.0, np.round(auto[bright] / 8.0))
    assert not np.allclose(auto[~bright], np.round(auto[~bright] / 8.0) * 8.0)


def test_training_configs_vary_and_never_make_the_heldout_family():
    rng = np.random.default_rng(11)
    cfgs = [random_train_config(rng) for _ in range(300)]
    held = heldout_config()
    assert {c.dtype for c in cfgs} == {"uint16", "float32"}
    assert {c.gain_mode for c in cfgs} == {"high", "medium", "low", "auto"}
    assert any(c.ice_photons > 0 for c in cfgs) and any(c.jet_photons > 0 for c in cfgs)
    assert any(c.water_photons > 0 for c in cfgs) and any(c.water_photons == 0 for c in cfgs)
    assert len({c.adu_per_photon for c in cfgs}) >= 4
    for c in cfgs:
        assert c.family == TRAIN_FAMILY and c.background_model == "rings"
        assert c.pixel_size_um != held.pixel_size_um and c.shape[1:] != held.shape[1:]
    assert held.family == HELDOUT_FAMILY and held.background_model == "diffuse"


def test_families_hits_non_hits_and_shift():
    train = family_frames(TRAIN_FAMILY, 6, seed=1, shape=(2, 64, 64))
    held = family_frames(HELDOUT_FAMILY, 2, seed=1, shape=(1, 64, 128))
    hits = [f.meta["hit"] for f in train.frames]
    assert any(hits) and not all(hits)
    assert {f.meta["family"] for f in held.frames} == {HELDOUT_FAMILY}
    assert held.shape == (1, 64, 128) and train.shape == (2, 64, 64)
    # the held-out background has a per-panel pedestal drift and no ring: its expectation differs
    sim = DiffractionSimulator(heldout_config((2, 64, 128)), seed=0)
    assert sim.cfg.background_model == "diffuse" and np.abs(sim.pedestal_drift).max() > 0


def test_config_validation():
    with pytest.raises(ValueError):
        DiffractionConfig(dtype="int32")
    with pytest.raises(ValueError):
        DiffractionConfig(gain_mode="turbo")
    with pytest.raises(ValueError):
        DiffractionConfig(shape=(1, 8, 8))
