"""Diffraction-like frames with ground truth: a crystal lattice meeting the Ewald sphere.

`bragg.py` scatters Gaussian spots at random places; a net trained on that learns spots, not
diffraction. Here a frame is what a serial-crystallography detector records:

* a crystal (random unit cell, uniformly random orientation) whose reciprocal-lattice points
  near the Ewald sphere diffract; a reflection's intensity is a Wilson-distributed |F|^2 times a
  resolution fall-off exp(-B s^2 / 2) (s = 1/d), a polarisation factor and its partiality
  exp(-e^2 / 2 w^2), e being the point's distance from the sphere (excitation error);
* spots land where the diffracted beam meets a flat detector of panels in a mosaic with gaps;
  a spot whose centre falls in a gap is lost, one on an edge is cut;
* background: flat plus air scatter, a water ring, optional ice rings (hexagonal ice d-spacings)
  and a liquid-jet streak through the beam centre (training families); the held-out family has
  a background model training never sees (anisotropic diffuse halo, per-panel pedestal drift);
* detector: Poisson photons, per-pixel gain error, readout noise, a gain mode (fixed high /
  medium / low, or auto-ranging: bright pixels recorded in a coarser gain stage), ADU per photon,
  double-size pixels on ASIC boundaries, noisy panel borders, hot and dead pixels, uint16 (with
  an optional pedestal offset, clipped at 0 and 65535) or float32 output;
* hits (a crystal) and non-hits (background only).

Truth: reflections with SNR >= `label_snr` and at least `min_photons` photons in their brightest
pixel, centres on a panel and not on a bad pixel. Drawn reflections that miss those rules (too
weak, cut by an edge, merged with a brighter neighbour) are listed in `SimFrame.ignore`: a
finder that reports one is neither right nor wrong (see peaknet_daemon.evaluation). SNR is as in
`bragg.py`: the brightest expected peak pixel over the local noise sigma, where the noise now
includes readout noise and gain quantisation.

Deterministic per (config, seed, seq). Positions use the pixel-centre convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .bragg import PeakObserver, SimFrame, _tile_grid

HC_EV_A = 12398.4198
WATER_D_A = 3.1
ICE_D_A = (3.897, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883)  # hexagonal ice Ih
GAIN_MODES = ("high", "medium", "low", "auto")
# Photons per gain-stage ADU step relative to the high stage: a coarser stage quantises harder.
GAIN_STEP_PHOTONS = {"high": 0.0, "medium": 1.0, "low": 8.0}
TRAIN_FAMILY = "lattice"
HELDOUT_FAMILY = "heldout-jungfrau-diffuse"


@dataclass
class DiffractionConfig:
    """One detector + beam + background + crystal-population setting."""

    shape: tuple[int, int, int] = (4, 352, 384)
    asic: tuple[int, int] = (176, 192)  # ASIC size within a panel (double pixels on its borders)
    pixel_size_um: float = 100.0
    panel_gap_px: int = 4
    beam_offset_px: tuple[float, float] = (0.0, 0.0)
    detector_distance_mm: float = 60.0
    photon_energy_ev: float = 9500.0
    dtype: str = "uint16"
    adu_per_photon: float = 1.0
    gain_mode: str = "high"
    auto_switch_photons: float = 40.0  # auto gain: pixels above this are recorded in "medium"
    pedestal_adu: float = 0.0  # offset kept in uint16 output so that noise below 0 survives
    readout_noise_photons: float = 0.1
    gain_error: float = 0.02  # per-pixel relative gain spread (flat-field residual)
    border_noise_factor: float = 3.0  # readout noise on panel borders, times the above
    hot_pixels: int = 4  # per panel
    dead_pixels: int = 8  # per panel
    hot_level_photons: tuple[float, float] = (20.0, 2000.0)
    # background (photons per pixel)
    background_photons: float = 1.0  # flat
    air_scatter_photons: float = 1.0  # at the beam centre, falling as 1 / (1 + (r / 300 px)^2)
    water_photons: float = 2.0  # water ring peak height
    ice_photons: float = 0.0  # each ice ring's peak height (0: no ice)
    jet_photons: float = 0.0  # jet streak height at the beam centre (0: no streak)
    jet_angle_deg: float = 90.0
    jet_width_px: float = 1.5
    background_model: str = "rings"  # "rings" (training) or "diffuse" (held out)
    # crystals
    hit_fraction: float = 0.7
    cell_a: tuple[float, float] = (30.0, 150.0)  # unit-cell edges, log-uniform, Angstrom
    min_spacing_px: float = 7.0  # cells are capped so that spots this far apart are resolved
    reflection_photons: tuple[float, float] = (50.0, 20000.0)  # mean full-reflection photons at s = 0
    b_factor: tuple[float, float] = (10.0, 60.0)
    rocking_width: tuple[float, float] = (1e-4, 1e-3)  # 1/Angstrom, Gaussian sigma of partiality
    sigma_px: tuple[float, float] = (0.6, 1.3)
    radial_elongation: tuple[float, float] = (0.0, 0.6)  # spot sigma grows along the radius at the edge
    label_snr: float = 2.0
    min_photons: float = 2.0
    merge_px: float = 3.0
    family: str = TRAIN_FAMILY

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 3 or min(self.shape[1:]) < 16:
            raise ValueError(f"shape must be (panels, H >= 16, W >= 16), got {self.shape}")
        if self.dtype not in ("uint16", "float32"):
            raise ValueError(f"dtype must be uint16 or float32, got {self.dtype!r}")
        if self.gain_mode not in GAIN_MODES:
            raise ValueError(f"gain_mode must be one of {GAIN_MODES}, got {self.gain_mode!r}")
        if self.background_model not in ("rings", "diffuse"):
            raise ValueError(f"background_model must be rings or diffuse, got {self.background_model!r}")
        if self.detector_distance_mm <= 0 or self.photon_energy_ev <= 0 or self.adu_per_photon <= 0:
            raise ValueError("distance, photon energy and ADU per photon must be > 0")

    @property
    def wavelength_a(self) -> float:
        return HC_EV_A / self.photon_energy_ev


@dataclass
class Geometry:
    """Per-pixel lab positions of a panel mosaic: x, y (mm, beam at 0), radius (px), s = 1/d."""

    x_mm: np.ndarray
    y_mm: np.ndarray
    radius_px: np.ndarray
    s: np.ndarray
    two_theta: np.ndarray
    origin: np.ndarray  # (P, 2) mosaic row/col of each panel's pixel (0, 0), beam at (0, 0)
    rows: int
    cols: int


def geometry(cfg: DiffractionConfig) -> Geometry:
    """Panels in a near-square mosaic, `panel_gap_px` apart, beam near the mosaic centre."""
    p, h, w = cfg.shape
    rows, cols = _tile_grid(p, h, w)
    gap = cfg.panel_gap_px
    height, width = rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap
    cy, cx = (height - 1) / 2 + cfg.beam_offset_px[0], (width - 1) / 2 + cfg.beam_offset_px[1]
    origin = np.array([[(i // cols) * (h + gap) - cy, (i % cols) * (w + gap) - cx] for i in range(p)])
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    y_px = origin[:, 0, None, None] + yy[None]
    x_px = origin[:, 1, None, None] + xx[None]
    mm = cfg.pixel_size_um * 1e-3
    radius = np.hypot(y_px, x_px)
    two_theta = np.arctan2(radius * mm, cfg.detector_distance_mm)
    s = 2 * np.sin(two_theta / 2) / cfg.wavelength_a
    return Geometry(x_px * mm, y_px * mm, radius, s, two_theta, origin, rows, cols)


def polarisation(two_theta: np.ndarray, azimuth: np.ndarray, fraction: float = 0.99) -> np.ndarray:
    """Intensity factor of a beam polarised horizontally (x) with this degree of polarisation."""
    sin2 = np.sin(two_theta) ** 2
    return fraction * (1 - sin2 * np.cos(azimuth) ** 2) + (1 - fraction) * (1 - sin2 * np.sin(azimuth) ** 2)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix uniformly distributed over SO(3) (normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a + b*b - c*c - d*d, 2 * (b*c - a*d), 2 * (b*d + a*c)],
                     [2 * (b*c + a*d), a*a - b*b + c*c - d*d, 2 * (c*d - a*b)],
                     [2 * (b*d - a*c), 2 * (c*d + a*b), a*a - b*b - c*c + d*d]])


def reciprocal_basis(a: float, b: float, c: float, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Columns a*, b*, c* (1/Angstrom) of a cell with edges in Angstrom and angles in degrees."""
    al, be, ga = (math.radians(v) for v in (alpha, beta, gamma))
    cz = math.sqrt(max(1 - math.cos(be) ** 2 - ((math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)) ** 2,
                       1e-9))
    real = np.array([[a, b * math.cos(ga), c * math.cos(be)],
                     [0.0, b * math.sin(ga), c * (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)],
                     [0.0, 0.0, c * cz]])  # columns a, b, c
    return np.linalg.inv(real).T  # columns a*, b*, c*: a_i . a*_j = delta_ij


def ewald_reflections(recip: np.ndarray, wavelength: float, s_max: float, tolerance: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Miller indices (n, 3) whose reciprocal-lattice point lies within `tolerance` (1/A) of the
    Ewald sphere and within resolution s_max, and their excitation errors (|k0 + q| - 1/lambda).

    Solved per (h, k) as a quadratic in l, so cells of 300 A cost no more than (2 h_max + 1)^2."""
    k0 = np.array([0.0, 0.0, 1.0 / wavelength])  # beam along +z
    radius = 1.0 / wavelength
    real = np.linalg.inv(recip.T)  # columns a, b, c: h = q . a, so |h| <= s_max |a|
    hmax, kmax = (int(np.floor(s_max * np.linalg.norm(real[:, i]))) for i in (0, 1))
    h, k = np.meshgrid(np.arange(-hmax, hmax + 1), np.arange(-kmax, kmax + 1), indexing="ij")
    h, k = h.ravel(), k.ravel()
    p = k0[None] + h[:, None] * recip[:, 0] + k[:, None] * recip[:, 1]  # k0 + q(h, k, 0)
    c = recip[:, 2]
    cc = float(c @ c)
    pc = p @ c
    pp = np.einsum("ij,ij->i", p, p)
    # l where |p + l c| <= radius + tolerance: an interval; drop the part inside radius - tolerance.
    outer = pc ** 2 - cc * (pp - (radius + tolerance) ** 2)
    ok = outer >= 0
    root = np.sqrt(np.where(ok, outer, 0.0))
    lo = np.ceil((-pc - root) / cc).astype(np.int64)
    hi = np.floor((-pc + root) / cc).astype(np.int64)
    n = np.where(ok, np.maximum(hi - lo + 1, 0), 0)
    if n.sum() == 0:
        return np.zeros((0, 3), np.int64), np.zeros(0)
    idx = np.repeat(np.arange(len(h)), n)
    start = np.repeat(np.cumsum(n) - n, n)
    ll = lo[idx] + (np.arange(int(n.sum())) - start)
    hkl = np.stack([h[idx], k[idx], ll], 1)
    q = hkl @ recip.T
    err = np.linalg.norm(k0[None] + q, axis=1) - radius
    keep = (np.abs(err) <= tolerance) & (np.linalg.norm(q, axis=1) <= s_max) & (np.abs(hkl).sum(1) > 0)
    return hkl[keep], err[keep]


class _Placed:
    """Truth peaks placed so far, bucketed by `radius`-sized cells: whether a new one lies within
    `radius` of one looks at 9 cells, not at every peak (a frame can hold thousands)."""

    def __init__(self, radius: float):
        self.radius = float(radius)
        self.cells: dict[tuple[int, int, int], list[tuple[float, float]]] = {}

    def _cell(self, y: float, x: float) -> tuple[int, int]:
        return math.floor(y / self.radius), math.floor(x / self.radius)

    def near(self, panel: int, y: float, x: float) -> bool:
        cy, cx = self._cell(y, x)
        r2 = self.radius ** 2
        return any((qy - y) ** 2 + (qx - x) ** 2 < r2
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   for qy, qx in self.cells.get((panel, cy + dy, cx + dx), ()))

    def add(self, panel: int, y: float, x: float) -> None:
        self.cells.setdefault((panel, *self._cell(y, x)), []).append((y, x))


class DiffractionSimulator:
    """Frames of one DiffractionConfig; `simulate(seq)` is deterministic per (seed, seq)."""

    def __init__(self, cfg: DiffractionConfig, seed: int = 0, on_peak: Optional[PeakObserver] = None):
        self.cfg, self.seed = cfg, int(seed)
        self.on_peak = on_peak  # see bragg.PeakObserver
        self.geom = geometry(cfg)
        p, h, w = cfg.shape
        rng = np.random.default_rng([self.seed, 0xD1F])
        self.gain = (1.0 + cfg.gain_error * rng.standard_normal(cfg.shape)).astype(np.float32)
        # Pixel area: double-size pixels on the ASIC boundaries inside a panel.
        self.area = np.ones(cfg.shape, np.float32)
        ay, ax = cfg.asic
        for b in range(ay, h, ay):
            self.area[:, b - 1:b + 1, :] *= 2.0
        for b in range(ax, w, ax):
            self.area[:, :, b - 1:b + 1] *= 2.0
        self.border = np.zeros(cfg.shape, bool)
        self.border[:, [0, -1], :] = True
        self.border[:, :, [0, -1]] = True
        n_pix = h * w
        self.hot = np.zeros(cfg.shape, bool)
        self.dead = np.zeros(cfg.shape, bool)
        for i in range(p):
            pick = rng.choice(n_pix, size=min(n_pix, cfg.hot_pixels + cfg.dead_pixels), replace=False)
            self.hot[i].flat[pick[:cfg.hot_pixels]] = True
            self.dead[i].flat[pick[cfg.hot_pixels:]] = True
        self.hot_value = np.exp(rng.uniform(*np.log(cfg.hot_level_photons), size=int(self.hot.sum())))
        self.bad = self.hot | self.dead
        self.azimuth = np.arctan2(self.geom.y_mm, self.geom.x_mm)
        self.pol = polarisation(self.geom.two_theta, self.azimuth)
        self.pedestal_drift = np.zeros(p)
        if cfg.background_model == "diffuse":
            self.pedestal_drift = rng.normal(0.0, 0.3, size=p)  # photons; panels disagree a little

    # -- background --------------------------------------------------------------------------
    def expected_background(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Expected photons per pixel before gain and area (P, H, W); `rng` varies the frame's
        ring and streak strengths by +-20 % as shot-to-shot jitter does."""
        cfg, g = self.cfg, self.geom
        jit = (lambda: 1.0) if rng is None else (lambda: float(rng.uniform(0.8, 1.2)))
        bg = np.full(cfg.shape, cfg.background_photons, np.float64)
        bg += cfg.air_scatter_photons * jit() / (1.0 + (g.radius_px / 300.0) ** 2)
        if cfg.water_photons > 0:
            bg += cfg.water_photons * jit() * np.exp(-0.5 * ((g.s - 1 / WATER_D_A) / 0.035) ** 2)
        if cfg.ice_photons > 0:
            for i, d in enumerate(ICE_D_A):
                strength = cfg.ice_photons * (1.0 if i < 3 else 0.4)
                bg += strength * jit() * np.exp(-0.5 * ((g.s - 1 / d) / 0.0025) ** 2)
        if cfg.jet_photons > 0:
            phi = math.radians(cfg.jet_angle_deg)
            ypx, xpx = g.y_mm / (cfg.pixel_size_um * 1e-3), g.x_mm / (cfg.pixel_size_um * 1e-3)
            perp = np.abs(-math.sin(phi) * xpx + math.cos(phi) * ypx)
            bg += cfg.jet_photons * jit() * np.exp(-0.5 * (perp / cfg.jet_width_px) ** 2) / (1 + g.radius_px / 150.0)
        if cfg.background_model == "diffuse":
            # Anisotropic diffuse halo (not in training): an ellipse around the beam, broad.
            ang = self.azimuth
            stretch = 1.0 + 0.5 * np.cos(2 * (ang - 0.6))
            bg += 3.0 * jit() * np.exp(-0.5 * ((g.s * stretch - 0.22) / 0.08) ** 2)
            bg += self.pedestal_drift[:, None, None].clip(min=-0.5 * cfg.background_photons)
        return np.clip(bg * self.pol, 0.0, None)

    # -- crystal -----------------------------------------------------------------------------
    def _crystal(self, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        # Experiments put the detector where neighbouring spots are resolved: keep the largest
        # cell edge's spot spacing on the detector, D lambda / a, at >= min_spacing_px pixels.
        a_fit = cfg.detector_distance_mm * cfg.wavelength_a / (cfg.min_spacing_px * cfg.pixel_size_um * 1e-3)
        hi = min(cfg.cell_a[1], a_fit)
        lo, hi = np.log(min(cfg.cell_a[0], hi)), np.log(hi)
        a, b, c = np.exp(rng.uniform(lo, hi, size=3))
        system = rng.integers(3)
        angles = (90.0, 90.0, 90.0) if system == 0 else (90.0, 90.0, 120.0) if system == 1 else \
            tuple(rng.uniform(75.0, 105.0, size=3))
        if system == 1:
            b = a
        recip = random_rotation(rng) @ reciprocal_basis(a, b, c, *angles)
        return {"cell": (float(a), float(b), float(c), *map(float, angles)), "recip": recip,
                "scale": float(np.exp(rng.uniform(*np.log(cfg.reflection_photons)))),
                "b_factor": float(rng.uniform(*cfg.b_factor)),
                "width": float(np.exp(rng.uniform(*np.log(cfg.rocking_width)))),
                "sigma": float(rng.uniform(*cfg.sigma_px)),
                "elong": float(rng.uniform(*cfg.radial_elongation))}

    def reflections(self, crystal: dict, wavelength: float) -> dict[str, np.ndarray]:
        """Reflections of this crystal on the detector: panel, y, x (px), s, partiality, photons."""
        cfg, g = self.cfg, self.geom
        s_max = float(g.s.max()) * 1.01
        hkl, err = ewald_reflections(crystal["recip"], wavelength, s_max, 3.0 * crystal["width"])
        q = hkl @ crystal["recip"].T
        kout = q + np.array([0.0, 0.0, 1.0 / wavelength])
        fwd = kout[:, 2] > 1e-9
        hkl, err, q, kout = hkl[fwd], err[fwd], q[fwd], kout[fwd]
        px_mm = cfg.pixel_size_um * 1e-3
        ypx = cfg.detector_distance_mm * kout[:, 1] / kout[:, 2] / px_mm
        xpx = cfg.detector_distance_mm * kout[:, 0] / kout[:, 2] / px_mm
        _, h, w = cfg.shape
        panel = np.full(len(ypx), -1)
        py, pxx = np.zeros(len(ypx)), np.zeros(len(ypx))
        for i, (oy, ox) in enumerate(self.geom.origin):
            ly, lx = ypx - oy, xpx - ox
            inside = (ly > -0.5) & (ly < h - 0.5) & (lx > -0.5) & (lx < w - 0.5)
            panel[inside], py[inside], pxx[inside] = i, ly[inside], lx[inside]
        on = panel >= 0
        s = np.linalg.norm(q, axis=1)
        part = np.exp(-0.5 * (err / crystal["width"]) ** 2)
        two_theta = 2 * np.arcsin(np.clip(s * wavelength / 2, 0, 1))
        pol = polarisation(two_theta, np.arctan2(ypx, xpx))
        # Full-reflection photons before |F|^2, which the caller draws (Wilson: exponential).
        photons = crystal["scale"] * np.exp(-crystal["b_factor"] * s ** 2 / 2) * part * pol
        return {"panel": panel[on], "y": py[on], "x": pxx[on], "s": s[on], "partiality": part[on],
                "photons": photons[on], "hkl": hkl[on]}

    # -- frame -------------------------------------------------------------------------------
    def simulate(self, seq: int) -> SimFrame:
        """One frame with truth (see the module doc)."""
        return self.simulate_draws(seq, 1)[0]

    def simulate_draws(self, seq: int, draws: int) -> list[SimFrame]:
        """`draws` frames of one expectation (crystal, orientation, background): the same truth,
        mask and meta, independent photon and readout noise. Why: the expectation (crystal,
        reflections, background) costs more than the noise, and a trainer that sees each panel
        many times learns its noise; several draws give it more distinct panels per second
        (tools/bench_train.py --data-draws). The first is `simulate(seq)`."""
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, int(seq) + 1])
        energy = cfg.photon_energy_ev * (1 + rng.normal(0.0, 5e-4))
        wavelength = HC_EV_A / energy
        bg = self.expected_background(rng) * self.area
        expected = bg.copy()
        p, h, w = cfg.shape
        hit = bool(rng.random() < cfg.hit_fraction)
        step = self._step_photons()
        noise_var = bg + (cfg.readout_noise_photons * np.where(self.border, cfg.border_noise_factor, 1.0)) ** 2 \
            + step ** 2 / 12
        cols: dict[str, list] = {k: [] for k in ("panel", "y", "x", "intensity", "snr")}
        ign: dict[str, list] = {k: [] for k in ("panel", "y", "x", "snr")}
        mask = np.zeros(cfg.shape, bool)
        meta: dict = {"family": cfg.family, "photon_energy_ev": float(energy),
                      "detector_distance_mm": float(cfg.detector_distance_mm)}
        if hit:
            crystal = self._crystal(rng)
            refl = self.reflections(crystal, wavelength)
            n = len(refl["y"])
            refl["photons"] = refl["photons"] * rng.exponential(1.0, size=n)  # Wilson |F|^2
            meta.update(cell=crystal["cell"], n_reflections=int(n))
            self._draw(rng, refl, crystal, expected, noise_var, mask, cols, ign)
        peaks = {"panel": np.asarray(cols["panel"], np.int32),
                 **{k: np.asarray(cols[k], np.float64) for k in ("y", "x", "intensity", "snr")}}
        ignore = {"panel": np.asarray(ign["panel"], np.int32),
                  **{k: np.asarray(ign[k], np.float64) for k in ("y", "x", "snr")}}
        meta.update(hit=hit, n_peaks=int(len(peaks["y"])), n_ignored=int(len(ignore["y"])))
        frames = []
        for _ in range(max(1, int(draws))):
            data = self._record(rng, rng.poisson(expected).astype(np.float64))
            frames.append(SimFrame(data=data, peaks=peaks, mask=mask, meta=dict(meta), ignore=ignore))
        return frames

    def _step_photons(self) -> np.ndarray | float:
        """Quantisation step (photons) of the recorded gain stage, per pixel or for the frame."""
        cfg = self.cfg
        if cfg.gain_mode == "auto":
            return 0.0  # only bright pixels switch; their variance is added where they switch
        return GAIN_STEP_PHOTONS[cfg.gain_mode]

    def _draw(self, rng: np.random.Generator, refl: dict, crystal: dict, expected: np.ndarray,
              noise_var: np.ndarray, mask: np.ndarray, cols: dict, ign: dict) -> None:
        """Adds every visible reflection's expected signal; sorts them into truth and ignore."""
        cfg = self.cfg
        _, h, w = cfg.shape
        sigma0, elong = crystal["sigma"], crystal["elong"]
        r_max = float(self.geom.radius_px.max())
        order = np.argsort(-refl["photons"])
        placed = _Placed(cfg.merge_px)
        for j in order:
            panel, y, x = int(refl["panel"][j]), float(refl["y"][j]), float(refl["x"][j])
            oy, ox = self.geom.origin[panel]
            ry, rx = y + oy, x + ox
            rad = math.hypot(ry, rx)
            s_rad = sigma0 * (1 + elong * rad / r_max)
            iy, ix = int(round(y)), int(round(x))
            photons = float(refl["photons"][j])
            peak_guess = photons / (2 * math.pi * sigma0 * s_rad)
            if peak_guess < 0.5 * math.sqrt(max(float(noise_var[panel, iy, ix]), 1e-3)):
                continue  # invisible: not drawn, not listed (the SNR < 0.5 tail is huge)
            r = int(math.ceil(3.5 * s_rad))
            y0, y1, x0, x1 = max(0, iy - r), min(h, iy + r + 1), max(0, ix - r), min(w, ix + r + 1)
            yy, xx = np.meshgrid(np.arange(y0, y1) - y, np.arange(x0, x1) - x, indexing="ij")
            c, s = (rx / rad, ry / rad) if rad > 0 else (1.0, 0.0)
            u = xx * c + yy * s  # along the radius
            v = -xx * s + yy * c
            shape = np.exp(-0.5 * ((u / s_rad) ** 2 + (v / sigma0) ** 2)) / (2 * math.pi * sigma0 * s_rad)
            sig = photons * shape * self.area[panel, y0:y1, x0:x1]
            expected[panel, y0:y1, x0:x1] += sig
            k = np.unravel_index(np.argmax(sig), sig.shape)
            noise = math.sqrt(max(float(noise_var[panel, y0 + k[0], x0 + k[1]]), 1e-6))
            peak = float(sig[k])
            snr = peak / noise
            edge = min(y, x, h - 1 - y, w - 1 - x) < 1.0
            near = placed.near(panel, y, x)
            good = (snr >= cfg.label_snr and peak >= cfg.min_photons and not edge and not near
                    and not self.bad[panel, iy, ix])
            dest = cols if good else ign
            for key, val in (("panel", panel), ("y", y), ("x", x), ("snr", snr)):
                dest[key].append(val)
            if good:
                cols["intensity"].append(float(sig.sum()) * cfg.adu_per_photon)
                if self.on_peak is not None:
                    self.on_peak(snr, sig, noise_var[panel, y0:y1, x0:x1])
                win = np.sqrt(noise_var[panel, y0:y1, x0:x1])
                mask[panel, y0:y1, x0:x1] |= (sig >= win) | ((u / s_rad) ** 2 + (v / sigma0) ** 2 <= 1.0)
                placed.add(panel, y, x)

    def _record(self, rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
        """Photons to the detector's output: gain stage, noise, gain error, defects, dtype."""
        cfg = self.cfg
        step = GAIN_STEP_PHOTONS.get(cfg.gain_mode, 0.0)
        if cfg.gain_mode == "auto":
            bright = counts > cfg.auto_switch_photons
            q = GAIN_STEP_PHOTONS["low"]
            counts = np.where(bright, np.round(counts / q) * q, counts)
        elif step > 0:
            counts = np.round(counts / step) * step
        rn = cfg.readout_noise_photons * np.where(self.border, cfg.border_noise_factor, 1.0)
        val = (counts + rn * rng.standard_normal(cfg.shape)) * self.gain
        val[self.hot] = self.hot_value
        val[self.dead] = 0.0
        val = val * cfg.adu_per_photon
        if cfg.dtype == "uint16":
            return np.clip(np.rint(val + cfg.pedestal_adu), 0, 65535).astype(np.uint16)
        return val.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Families: what training draws from, and what evaluation holds out
# ------------------------------------------------------------------------------------------------

def distance_for_resolution(shape: tuple[int, int, int], pixel_um: float, gap: int, energy_ev: float,
                            edge_d_a: float) -> float:
    """Detector distance (mm) at which the middle of the mosaic's nearest edge is at `edge_d_a`."""
    p, h, w = shape
    rows, cols = _tile_grid(p, h, w)
    half = 0.5 * min(rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap) * pixel_um * 1e-3
    two_theta = 2 * math.asin(min(0.99, HC_EV_A / energy_ev / (2 * edge_d_a)))
    return half / math.tan(two_theta)


def random_train_config(rng: np.random.Generator, shape: tuple[int, int, int] = (4, 352, 384)
                        ) -> DiffractionConfig:
    """A random training-family config: ePix-like panels, ring/ice/jet backgrounds, any gain
    mode, ADU scale and dtype. Never the held-out detector or background model."""
    energy = float(rng.uniform(6000.0, 12000.0))
    gap = int(rng.choice([0, 2, 4, 8]))
    dist = distance_for_resolution(shape, 100.0, gap, energy, float(rng.uniform(1.6, 3.5)))
    gain_mode = str(rng.choice(["high", "high", "medium", "low", "auto", "auto"]))
    dtype = str(rng.choice(["uint16", "float32"]))
    adu = float(rng.choice([1.0, 1.0, 8.0, 10.0, 35.0])) if dtype == "uint16" else \
        float(rng.choice([1.0, 1.0, energy / 1000.0]))
    return DiffractionConfig(
        shape=shape, panel_gap_px=gap, pixel_size_um=100.0, photon_energy_ev=energy, detector_distance_mm=dist,
        beam_offset_px=tuple(rng.uniform(-20, 20, size=2)), dtype=dtype, adu_per_photon=adu, gain_mode=gain_mode,
        pedestal_adu=float(rng.choice([0.0, 0.0, 10.0, 100.0])) if dtype == "uint16" else 0.0,
        readout_noise_photons=float(rng.uniform(0.02, 0.3)), gain_error=float(rng.uniform(0.0, 0.05)),
        hot_pixels=int(rng.integers(0, 6)), dead_pixels=int(rng.integers(0, 12)),
        background_photons=float(np.exp(rng.uniform(np.log(0.02), np.log(4.0)))),
        air_scatter_photons=float(np.exp(rng.uniform(np.log(0.05), np.log(5.0)))),
        water_photons=float(rng.choice([0.0, 1.0]) * np.exp(rng.uniform(np.log(0.5), np.log(15.0)))),
        ice_photons=float((rng.random() < 0.25) * np.exp(rng.uniform(np.log(1.0), np.log(60.0)))),
        jet_photons=float((rng.random() < 0.3) * np.exp(rng.uniform(np.log(2.0), np.log(200.0)))),
        jet_angle_deg=float(rng.uniform(0, 180)), jet_width_px=float(rng.uniform(0.7, 3.0)),
        hit_fraction=0.7, family=TRAIN_FAMILY)


def heldout_config(shape: tuple[int, int, int] = (2, 512, 1024)) -> DiffractionConfig:
    """The distribution-shift family, never trained on: Jungfrau-like 512x1024 panels of 75 um
    with 256x256 ASICs, float32 in keV (9.5 keV photons), Gaussian readout noise 0.15 photons,
    and the "diffuse" background (anisotropic halo, per-panel pedestal drift) instead of rings."""
    energy = 9500.0
    return DiffractionConfig(
        shape=shape, asic=(256, 256), pixel_size_um=75.0, panel_gap_px=6, photon_energy_ev=energy,
        detector_distance_mm=distance_for_resolution(shape, 75.0, 6, energy, 2.2), dtype="float32",
        adu_per_photon=energy / 1000.0, gain_mode="auto", readout_noise_photons=0.15, gain_error=0.03,
        hot_pixels=3, dead_pixels=6, background_photons=0.6, air_scatter_photons=1.5, water_photons=0.0,
        background_model="diffuse", family=HELDOUT_FAMILY)


@dataclass
class FamilyFrames:
    """Frames of one evaluation family with the bad-pixel map and radius map of each frame's
    simulator (what a beamline would give peakfinder8)."""

    name: str
    frames: list[SimFrame]
    bad: list[np.ndarray] = field(default_factory=list)
    radius: list[np.ndarray] = field(default_factory=list)
    shape: tuple[int, int, int] = (0, 0, 0)


def family_frames(name: str, n: int, seed: int, shape: Optional[tuple[int, int, int]] = None,
                  frames_per_config: int = 1, on_peak: Optional[PeakObserver] = None) -> FamilyFrames:
    """`n` frames of family `name` ("lattice": random training-family configs; the held-out
    family: `heldout_config`); `on_peak` sees every true peak (bragg.PeakObserver)."""
    rng = np.random.default_rng([int(seed), 0xE7A1])
    out = FamilyFrames(name, [])
    sim: Optional[DiffractionSimulator] = None
    for i in range(n):
        if sim is None or i % frames_per_config == 0:
            if name == TRAIN_FAMILY:
                cfg = random_train_config(rng, shape or (4, 352, 384))
            elif name == HELDOUT_FAMILY:
                cfg = heldout_config(shape or (2, 512, 1024))
            else:
                raise ValueError(f"unknown family {name!r}; known: {TRAIN_FAMILY}, {HELDOUT_FAMILY}")
            sim = DiffractionSimulator(cfg, seed=int(rng.integers(2**31)), on_peak=on_peak)
        out.frames.append(sim.simulate(i))
        out.bad.append(sim.bad)
        out.radius.append(sim.geom.radius_px)
        out.shape = sim.cfg.shape
    return out
