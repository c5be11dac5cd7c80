"""The classical finder on synthetic frames: spots found where they are, nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from peaknet_daemon.config import ClassicalConfig
from peaknet_daemon.model.classical import ClassicalFinder, annulus_rows, annulus_sum
from peaknet_daemon.peaks import extract_peaks


def spots_frame(rng: np.random.Generator, panels: int, h: int, w: int, n_spots: int,
                background: float = 20.0, amplitude: float = 300.0, sigma: float = 1.0):
    """Poisson background with Gaussian spots at random sub-pixel positions (kept apart)."""
    yy, xx = np.mgrid[0:h, 0:w]
    truth = []
    lam = np.full((panels, h, w), background)
    for p in range(panels):
        placed: list[tuple[float, float]] = []
        while len(placed) < n_spots:
            cy, cx = rng.uniform(8, h - 8), rng.uniform(8, w - 8)
            if all((cy - y) ** 2 + (cx - x) ** 2 > 20 ** 2 for y, x in placed):
                placed.append((cy, cx))
                lam[p] += amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
        truth.append(placed)
    return rng.poisson(lam).astype(np.float32), truth


def test_annulus_sum_matches_convolution() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 30, 41))
    for inner, outer in [(3, 6), (1, 2), (4, 9)]:
        yy, xx = np.mgrid[-outer:outer + 1, -outer:outer + 1]
        r2 = yy ** 2 + xx ** 2
        kernel = ((r2 >= inner ** 2) & (r2 <= outer ** 2)).astype(float)
        ref = np.stack([ndimage.convolve(a, kernel, mode="constant") for a in x])
        got = annulus_sum(torch.from_numpy(x), annulus_rows(inner, outer), outer).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_spots_found_at_right_positions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    panels, h, w = 2, 96, 128
    frame, truth = spots_frame(rng, panels, h, w, n_spots=6)
    cfg = ClassicalConfig(snr_threshold=6.0, min_pixels=2, max_pixels=50)
    finder = ClassicalFinder(cfg, (panels, h, w))
    mask, signal = finder(torch.from_numpy(frame)[:, None])
    res = extract_peaks(mask, signal, 64, cfg.min_pixels, cfg.max_pixels)
    for p in range(panels):
        n = int(res.counts[p])
        assert n == len(truth[p])  # every spot, no false peaks
        found = res.peaks[p, :n, :2].numpy()
        for cy, cx in truth[p]:
            d = np.hypot(found[:, 0] - cy, found[:, 1] - cx).min()
            assert d < 0.5
        assert (res.peaks[p, :n, 2] > 0).all()


def test_background_subtracted_signal_is_flat() -> None:
    rng = np.random.default_rng(3)
    frame = rng.poisson(50.0, size=(1, 64, 64)).astype(np.float32) + 1000.0
    finder = ClassicalFinder(ClassicalConfig(), (1, 64, 64))
    mask, signal = finder(torch.from_numpy(frame)[:, None])
    assert abs(float(signal.mean())) < 1.0  # the pedestal and the mean are removed
    assert not mask.any()


def test_bad_pixel_mask_suppresses_hot_pixel(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    panels, h, w = 2, 48, 48
    frames = rng.poisson(20.0, size=(2 * panels, h, w)).astype(np.float32)  # two frames
    hot = (1, 20, 30)
    frames[hot[0], hot[1]:hot[1] + 2, hot[2]:hot[2] + 2] = 5000.0          # frame 0, panel 1
    frames[panels + hot[0], hot[1]:hot[1] + 2, hot[2]:hot[2] + 2] = 5000.0  # frame 1, panel 1
    images = torch.from_numpy(frames)[:, None]
    cfg = ClassicalConfig(min_pixels=2)

    plain_mask, _ = ClassicalFinder(cfg, (panels, h, w))(images)
    assert plain_mask[1, hot[1], hot[2]] and plain_mask[3, hot[1], hot[2]]

    bad = np.zeros((panels, h, w), dtype=np.uint8)
    bad[hot[0], hot[1]:hot[1] + 2, hot[2]:hot[2] + 2] = 1
    np.save(tmp_path / "bad.npy", bad)
    masked = ClassicalFinder(ClassicalConfig(min_pixels=2, bad_pixel_mask=str(tmp_path / "bad.npy")),
                             (panels, h, w))
    mask, signal = masked(images)
    assert not mask.any()
    assert (signal[1, hot[1]:hot[1] + 2, hot[2]:hot[2] + 2] == 0).all()


def test_bad_pixel_mask_shape_checked(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((3, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        ClassicalFinder(ClassicalConfig(bad_pixel_mask=str(tmp_path / "bad.npy")), (2, 8, 8))
