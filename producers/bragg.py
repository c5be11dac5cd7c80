"""Simulated serial-crystallography frames with ground truth, for testing peak finders.

A frame is background photons (a flat level plus a water ring, Poisson-sampled) plus Gaussian
Bragg peaks at known sub-pixel positions, with fixed hot and dead pixels. Everything is
deterministic per (seed, seq), so a truth file and a replayed run can be checked exactly.

Conventions
- Positions use the pixel-centre convention: the centre of pixel (0, 0) is (0.0, 0.0).
- SNR of a peak: its largest expected pixel value above the local expected background, divided
  by the background noise sigma there, sqrt(expected background photons) (Poisson). The peak
  amplitude is derived from an SNR drawn log-uniformly from `snr_range`.
- Intensity: the expected integrated photons of the peak (sum over its window), times
  `adu_per_photon`, i.e. in output units. The sampled frame is Poisson around that.
- `mask`: pixels of true peaks, where the expected peak signal is at least one background sigma
  or within one `sigma` of the centre.
- `panel_gap_px`: the gap between panels in the (virtual) assembled detector; it only moves the
  water ring, the frame itself is the stacked panels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .poisson import PoissonMap

DETECTORS: dict[str, tuple[int, int, int]] = {
    "epix10k2m": (16, 352, 384),
    "jungfrau4m": (8, 512, 1024),
    "rayonix": (1, 1920, 1920),
}
PIXEL_SIZE_UM = {"epix10k2m": 100.0, "jungfrau4m": 75.0, "rayonix": 88.6}
HOT_VALUE = 60000.0  # hot pixels read this, in output units
EDGE_PX = 3  # peaks stay at least this far from a panel edge
MIN_SEPARATION_PX = 6.0
WATER_RING_Q = 2.0  # 1/Angstrom; ~3.1 A, the liquid-water ring
WATER_RING_WIDTH_Q = 0.25


@dataclass
class BraggConfig:
    shape: tuple[int, int, int] = (16, 352, 384)
    dtype: str = "uint16"  # "uint16" (ADU) or "float32" (photons)
    peaks_per_frame: tuple[int, int] = (10, 60)  # inclusive range, for hits
    hit_fraction: float = 0.7
    snr_range: tuple[float, float] = (3.0, 30.0)
    sigma_px: tuple[float, float] = (0.6, 1.4)
    background_photons: float = 2.0  # mean expected background per pixel
    water_ring: bool = True
    hot_pixels: int = 20
    dead_pixels: int = 20
    adu_per_photon: float = 1.0
    photon_energy_ev: float = 9500.0
    detector_distance_mm: float = 100.0
    panel_gap_px: int = 0
    pixel_size_um: float = 100.0
    energy_jitter_ev: float = 2.0  # per-frame spread of the photon energy, like a SASE source

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be (panels, H, W), got {self.shape}")
        if min(self.shape[1:]) < 2 * EDGE_PX + 2:
            raise ValueError(f"panels of {self.shape[1:]} are too small for peaks")
        if self.dtype not in ("uint16", "float32"):
            raise ValueError(f"dtype must be uint16 or float32, got {self.dtype!r}")
        if self.background_photons <= 0:
            raise ValueError("background_photons must be > 0 (the SNR is relative to it)")
        if not 0.0 <= self.hit_fraction <= 1.0:
            raise ValueError("hit_fraction must be in [0, 1]")
        lo, hi = self.peaks_per_frame
        if not 0 <= lo <= hi:
            raise ValueError(f"peaks_per_frame must be a range lo <= hi, got {self.peaks_per_frame}")
        if not 0 < self.snr_range[0] <= self.snr_range[1]:
            raise ValueError(f"snr_range must be 0 < lo <= hi, got {self.snr_range}")
        if not 0 < self.sigma_px[0] <= self.sigma_px[1] <= 4:
            raise ValueError(f"sigma_px must be 0 < lo <= hi <= 4, got {self.sigma_px}")

    @classmethod
    def for_detector(cls, name: str, **kw) -> "BraggConfig":
        """The preset's shape and pixel size, other fields from `kw`."""
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
        return cls(shape=DETECTORS[name], pixel_size_um=PIXEL_SIZE_UM[name], **kw)


@dataclass
class SimFrame:
    data: np.ndarray
    peaks: dict[str, np.ndarray]
    mask: np.ndarray
    meta: dict = field(default_factory=dict)
    # Drawn peaks that are neither truth nor noise (too faint or cut; diffraction.py): a finder
    # reporting one is not charged a false positive. Columns panel, y, x, snr.
    ignore: dict = field(default_factory=dict)


def _tile_grid(panels: int, h: int, w: int) -> tuple[int, int]:
    """Rows and columns of the panel mosaic closest to square."""
    best = None
    for cols in range(1, panels + 1):
        rows = math.ceil(panels / cols)
        aspect = max(rows * h, cols * w) / min(rows * h, cols * w)
        if best is None or aspect < best[0]:
            best = (aspect, rows, cols)
    return best[1], best[2]


def expected_background(cfg: BraggConfig) -> np.ndarray:
    """Expected background photons per pixel (P, H, W): a flat level plus the water ring, scaled
    so that the detector mean is `background_photons`."""
    p, h, w = cfg.shape
    if not cfg.water_ring:
        return np.full(cfg.shape, cfg.background_photons, dtype=np.float64)
    rows, cols = _tile_grid(p, h, w)
    gap = cfg.panel_gap_px
    height, width = rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    wavelength = 12398.4198 / cfg.photon_energy_ev
    out = np.empty(cfg.shape)
    for i in range(p):
        r, c = divmod(i, cols)
        dy = r * (h + gap) + yy - (height - 1) / 2
        dx = c * (w + gap) + xx - (width - 1) / 2
        radius_mm = np.hypot(dy, dx) * cfg.pixel_size_um * 1e-3
        two_theta = np.arctan2(radius_mm, cfg.detector_distance_mm)
        q = 4 * np.pi * np.sin(two_theta / 2) / wavelength
        out[i] = 0.5 + 2.5 * np.exp(-0.5 * ((q - WATER_RING_Q) / WATER_RING_WIDTH_Q) ** 2)
    return out * (cfg.background_photons / out.mean())


# Called once per true peak with its SNR, its expected signal (photons, over its window) and the
# noise variance of those pixels without it (photons^2): what an ideal detector would know
# (tools/ideal_bound.py). Frames do not change when an observer is set.
PeakObserver = Callable[[float, np.ndarray, np.ndarray], None]


class BraggSimulator:
    """Frames for one configuration and seed; `simulate(seq)` is deterministic per (seed, seq)."""

    def __init__(self, cfg: BraggConfig, seed: int = 0, on_peak: Optional[PeakObserver] = None):
        self.cfg, self.seed = cfg, int(seed)
        self.on_peak = on_peak
        self._noise = PoissonMap(expected_background(cfg))
        self.background = self._noise.levels  # the expectation the samples follow exactly
        rng = np.random.default_rng([self.seed, 0xBAD])
        n_pix = int(np.prod(cfg.shape))
        bad = rng.choice(n_pix, size=min(n_pix, cfg.hot_pixels + cfg.dead_pixels), replace=False)
        self.hot = np.unravel_index(np.sort(bad[:cfg.hot_pixels]), cfg.shape)
        self.dead = np.unravel_index(np.sort(bad[cfg.hot_pixels:]), cfg.shape)
        self.bad = np.zeros(cfg.shape, dtype=bool)
        self.bad[self.hot] = True
        self.bad[self.dead] = True
        self._radius = int(math.ceil(4 * cfg.sigma_px[1]))

    def simulate(self, seq: int) -> SimFrame:
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, int(seq) + 1])
        counts = self._noise.sample(rng).astype(np.float32)
        hit = bool(rng.random() < cfg.hit_fraction)
        n_want = int(rng.integers(cfg.peaks_per_frame[0], cfg.peaks_per_frame[1] + 1)) if hit else 0
        mask = np.zeros(cfg.shape, dtype=bool)
        cols = {k: [] for k in ("panel", "y", "x", "intensity", "snr")}
        for panel, y, x in self._positions(rng, n_want):
            sigma = rng.uniform(*cfg.sigma_px)
            snr = float(np.exp(rng.uniform(np.log(cfg.snr_range[0]), np.log(cfg.snr_range[1]))))
            intensity = self._draw_peak(rng, counts, mask, panel, y, x, sigma, snr)
            for key, val in zip(cols, (panel, y, x, intensity, snr)):
                cols[key].append(val)
        peaks = {
            "panel": np.asarray(cols["panel"], dtype=np.int32),
            **{k: np.asarray(cols[k], dtype=np.float64) for k in ("y", "x", "intensity", "snr")},
        }
        meta = {
            "photon_energy_ev": float(cfg.photon_energy_ev + rng.normal(0.0, cfg.energy_jitter_ev)),
            "detector_distance_mm": float(cfg.detector_distance_mm),
            "hit": bool(len(peaks["panel"]) > 0),
            "n_peaks": int(len(peaks["panel"])),
        }
        return SimFrame(data=self._to_output(counts), peaks=peaks, mask=mask, meta=meta)

    def _positions(self, rng: np.random.Generator, n: int) -> list[tuple[int, float, float]]:
        """Up to n sub-pixel peak centres away from edges, bad pixels and each other."""
        p, h, w = self.cfg.shape
        placed: list[tuple[int, float, float]] = []
        for _ in range(50 * n):
            if len(placed) == n:
                break
            panel = int(rng.integers(p))
            y = float(rng.uniform(EDGE_PX, h - 1 - EDGE_PX))
            x = float(rng.uniform(EDGE_PX, w - 1 - EDGE_PX))
            iy, ix = int(round(y)), int(round(x))
            if self.bad[panel, iy - 2:iy + 3, ix - 2:ix + 3].any():
                continue
            if any(q == panel and (qy - y) ** 2 + (qx - x) ** 2 < MIN_SEPARATION_PX ** 2
                   for q, qy, qx in placed):
                continue
            placed.append((panel, y, x))
        return placed

    def _draw_peak(self, rng: np.random.Generator, counts: np.ndarray, mask: np.ndarray,
                   panel: int, y: float, x: float, sigma: float, snr: float) -> float:
        """Adds one Poisson-sampled Gaussian peak in a small window; returns its intensity."""
        _, h, w = self.cfg.shape
        r = self._radius
        y0, y1 = max(0, int(round(y)) - r), min(h, int(round(y)) + r + 1)
        x0, x1 = max(0, int(round(x)) - r), min(w, int(round(x)) + r + 1)
        yy, xx = np.meshgrid(np.arange(y0, y1) - y, np.arange(x0, x1) - x, indexing="ij")
        d2 = yy ** 2 + xx ** 2
        shape = np.exp(-d2 / (2 * sigma ** 2))
        local_bg = float(self.background[panel, int(round(y)), int(round(x))])
        bg_sigma = math.sqrt(local_bg)
        expected = shape * (snr * bg_sigma / shape.max())
        counts[panel, y0:y1, x0:x1] += rng.poisson(expected)
        if self.on_peak is not None:
            self.on_peak(snr, expected, self.background[panel, y0:y1, x0:x1])
        win_sigma = np.sqrt(self.background[panel, y0:y1, x0:x1])
        mask[panel, y0:y1, x0:x1] |= (expected >= win_sigma) | (d2 <= sigma ** 2)
        return float(expected.sum() * self.cfg.adu_per_photon)

    def _to_output(self, counts: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        if cfg.adu_per_photon != 1.0:
            counts *= cfg.adu_per_photon
        counts[self.hot] = HOT_VALUE
        counts[self.dead] = 0.0
        if cfg.dtype == "uint16":
            return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
        return counts


def bragg_items(sim: BraggSimulator, truth_in_meta: bool = False, pool: int = 0):
    """An endless stream of simulated frames as sender Items (seq 0, 1, ...), the peaks as
    truth; with `truth_in_meta` the peak columns also travel in meta as `truth_<key>` lists.
    With `pool` > 0 only frames 0..pool-1 are simulated and then cycled (frame seq is frame
    seq % pool, truth included), for rates beyond the simulation's ~30 frames/s."""
    from .item import Item

    cache: list = []
    seq = 0
    while True:
        if pool and seq >= pool:
            item = cache[seq % pool]
        else:
            frame = sim.simulate(seq)
            meta = dict(frame.meta)
            if truth_in_meta:
                meta.update({f"truth_{k}": v.tolist() for k, v in frame.peaks.items()})
            item = Item(frame.data, meta, truth=frame.peaks)
            if pool:
                cache.append(item)
        yield item
        seq += 1
