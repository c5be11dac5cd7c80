"""Exact Poisson sampling of a fixed per-pixel expectation map, fast enough for whole frames.

numpy's `Generator.poisson` costs ~150 ms for one 16x352x384 frame; the background expectation
of a simulated detector does not change between frames, so we quantise it to a few levels once
and sample by inverse CDF: a 16-bit uniform picks a bin of a per-level lookup table; bins that
straddle a step of the CDF (about Kmax in 65536 per level) are resolved exactly with a second,
continuous uniform. The result is an exact Poisson draw for the quantised expectation, tails
included (a plain 16-bit table would cut them off, and the tail is what fakes peaks).
"""

from __future__ import annotations

import numpy as np

_BINS = 1 << 16


def _cdf(lam: float, kmax: int) -> np.ndarray:
    """P(X <= k) for k = 0..kmax, the last entry forced to exactly 1."""
    pmf = np.empty(kmax + 1)
    pmf[0] = np.exp(-lam)
    for k in range(1, kmax + 1):
        pmf[k] = pmf[k - 1] * lam / k
    cdf = np.cumsum(pmf)
    cdf[-1] = 1.0
    return np.minimum(cdf, 1.0)


class PoissonMap:
    """Samples Poisson(expected) for a fixed expectation map; `levels` is the quantised map that
    the samples really follow (use it as the true expected background)."""

    def __init__(self, expected: np.ndarray, max_levels: int = 64):
        expected = np.asarray(expected, dtype=np.float64)
        if not np.all(np.isfinite(expected)) or expected.min() < 0:
            raise ValueError("expected counts must be finite and >= 0")
        lo, hi = float(expected.min()), float(expected.max())
        n_levels = 1 if hi - lo < 1e-9 else max_levels
        values = np.linspace(lo, hi, n_levels) if n_levels > 1 else np.array([lo])
        level = np.rint((expected - lo) / max(hi - lo, 1e-12) * (n_levels - 1)).astype(np.int32)
        self.levels = values[level].astype(np.float32)
        self.shape = expected.shape
        kmax = int(np.ceil(hi + 12 * np.sqrt(hi) + 20))
        self._sentinel = np.iinfo(np.uint8 if kmax < 255 else np.uint16).max
        self._lut = np.empty((n_levels, _BINS), dtype=np.uint8 if kmax < 255 else np.uint16)
        self._cdf = np.empty((n_levels, kmax + 1))
        edges = np.arange(_BINS + 1) / _BINS
        for i, lam in enumerate(values):
            cdf = _cdf(float(lam), kmax)
            self._cdf[i] = cdf
            first = np.searchsorted(cdf, edges[:-1], side="right")  # value at the bin's low edge
            last = np.searchsorted(cdf, edges[1:], side="left")  # value just below its high edge
            self._lut[i] = np.where(first == last, first, self._sentinel)
        self._flat_lut = self._lut.reshape(-1)
        self._base = level * _BINS  # index of each pixel's table row
        self._level = level

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One exact Poisson draw of the whole map (integer counts, the table's dtype)."""
        u = rng.integers(0, _BINS, size=self.shape, dtype=np.uint16)
        idx = self._base + u
        counts = np.take(self._flat_lut, idx)
        amb = np.flatnonzero(counts == self._sentinel)
        if amb.size:
            flat_u = u.reshape(-1)[amb]
            cont = (flat_u + rng.random(amb.size)) / _BINS
            cdf = self._cdf[self._level.reshape(-1)[amb]]
            counts.reshape(-1)[amb] = (cdf <= cont[:, None]).sum(axis=1)
        return counts
