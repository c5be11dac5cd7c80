"""Peak extraction on the device: peak-pixel mask -> connected components -> compact peak table.

Everything here stays on the mask's device; the only tensors that leave it are the fixed-size
`PeakTensors` (a few KB per panel), never the mask, the labels or the per-pixel signal. The
only host synchronisations are the convergence checks of `label_components`, one every few
iterations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PeakTensors(NamedTuple):
    """Per image: up to max_peaks rows [y, x, intensity, npix], brightest first.

    peaks (N, max_peaks, 4) float32, rows past counts[i] are zero; counts (N,) int32;
    overflow (N,) int32: peaks that passed the size filter but did not fit in max_peaks.
    Positions use the pixel-centre convention (the centre of pixel (0, 0) is (0.0, 0.0)).
    """

    peaks: torch.Tensor
    counts: torch.Tensor
    overflow: torch.Tensor


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max filter of (N, H, W) integer labels, zero outside (a separable max-pool that also
    works for int64 on every device)."""
    p = F.pad(x, (1, 1, 1, 1))
    r = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return torch.maximum(torch.maximum(r[:, :-2], r[:, 1:-1]), r[:, 2:])


def label_components(mask: torch.Tensor, check_every: int = 4, jumps: int = 2) -> torch.Tensor:
    """8-connected component labels of a (N, H, W) bool mask: int64, 0 = background.

    Each foreground pixel starts with its own flat index + 1 and treats its label as a pointer
    to the pixel it names. Every iteration (1) hooks: the pixel a label points to (its root)
    takes the largest label of the pointing pixel's 3x3 neighbourhood, so a whole tree learns
    of a neighbouring tree at once; (2) propagates that maximum locally; (3) pointer-jumps,
    label <- label of the pixel it names. Labels only grow and always name a pixel of the same
    component, so at the fixed point every component carries the flat index + 1 of its
    largest pixel. Hooking plus jumping converges in a few dozen iterations even on long
    snakes, where plain max propagation would need one iteration per pixel of the path.
    """
    if mask.dim() != 3:
        raise ValueError(f"mask must be (N, H, W), got shape {tuple(mask.shape)}")
    n, h, w = mask.shape
    hw = h * w
    fg = mask.reshape(n, hw).bool()
    own = torch.arange(hw, device=mask.device, dtype=torch.int64).expand(n, hw)
    lab = torch.where(fg, own + 1, 0)
    while True:
        before = lab
        for _ in range(check_every):
            nb = torch.where(fg, _max3x3(lab.view(n, h, w)).reshape(n, hw), 0)
            lab = lab.scatter_reduce(1, torch.where(fg, lab - 1, own), nb, reduce="amax", include_self=True)
            lab = torch.maximum(lab, nb)
            for _ in range(jumps):
                lab = lab.gather(1, torch.where(fg, lab - 1, own))
        if torch.equal(lab, before):
            return lab.view(n, h, w)


def extract_peaks(mask: torch.Tensor, signal: torch.Tensor, max_peaks: int, min_pixels: int,
                  max_pixels: int, valid: torch.Tensor | None = None) -> PeakTensors:
    """Per-component pixel count, summed signal and centroid, filtered and top-k'd per image.

    The centroid is weighted by max(signal, 0), or unweighted when a component has no positive
    signal. Components with min_pixels <= npix <= max_pixels are kept, the max_peaks brightest
    per image by summed signal; images with valid[i] False get none. All reductions are
    scatter_adds over the flat labels plus one topk: no loop over images or peaks.
    """
    n, h, w = mask.shape
    hw = h * w
    dev = mask.device
    lab = label_components(mask).reshape(n, hw)
    sig = signal.reshape(n, hw).float()
    ys = torch.arange(h, device=dev, dtype=torch.float32).repeat_interleave(w).expand(n, hw)
    xs = torch.arange(w, device=dev, dtype=torch.float32).repeat(h).expand(n, hw)
    wgt = sig.clamp(min=0.0)
    ones = torch.ones_like(sig)
    src = torch.stack([ones, sig, wgt, wgt * ys, wgt * xs, ys, xs], dim=1)  # (N, 7, HW)
    stats = torch.zeros(n, 7, hw + 1, device=dev, dtype=torch.float32)
    stats.scatter_add_(2, lab.unsqueeze(1).expand(n, 7, hw), src)
    npix, inten, wsum, wy, wx, sy, sx = stats.unbind(1)  # bucket 0 is the background

    weighted = wsum > 0
    safe_w = torch.where(weighted, wsum, 1.0)
    safe_n = npix.clamp(min=1.0)
    y = torch.where(weighted, wy / safe_w, sy / safe_n)
    x = torch.where(weighted, wx / safe_w, sx / safe_n)

    keep = (npix >= min_pixels) & (npix <= max_pixels)
    keep[:, 0] = False
    if valid is not None:
        keep &= valid.to(dev).bool().reshape(n, 1)
    kept = keep.sum(dim=1)

    k = min(max_peaks, hw + 1)
    key = torch.where(keep, inten, float("-inf"))
    order = key.topk(k, dim=1, sorted=True).indices
    table = torch.stack([y, x, inten, npix], dim=-1).gather(1, order.unsqueeze(-1).expand(n, k, 4))
    rows = torch.arange(k, device=dev).unsqueeze(0) < kept.unsqueeze(1)
    table = torch.where(rows.unsqueeze(-1), table, 0.0)
    if k < max_peaks:
        table = F.pad(table, (0, 0, 0, max_peaks - k))
    counts = kept.clamp(max=max_peaks).to(torch.int32)
    overflow = (kept - max_peaks).clamp(min=0).to(torch.int32)
    return PeakTensors(table.contiguous(), counts, overflow)
