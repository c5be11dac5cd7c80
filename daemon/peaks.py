"""Peak extraction on the device: peak-pixel mask -> connected components -> compact peak table.

Peak pixels are a small fraction of a detector image, so the work runs on the list of
foreground pixels rather than on full images: one `nonzero` sizes that list (the only host
wait besides the convergence check of the labelling, usually one per batch), and everything
after it is proportional to the number of peak pixels. The only tensors that
leave the device are the fixed-size `PeakTensors` (a few KB per panel), never the mask, the
labels or the per-pixel signal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Half of the 8-neighbourhood: with it every 8-connected pair of pixels is one edge.
_FORWARD = ((0, 1), (1, -1), (1, 0), (1, 1))


class PeakTensors(NamedTuple):
    """Per image: up to max_peaks rows [y, x, intensity, npix], brightest first.

    peaks (N, max_peaks, 4) float32, rows past counts[i] are zero; counts (N,) int32;
    overflow (N,) int32: peaks that passed the size filter but did not fit in max_peaks.
    Positions use the pixel-centre convention (the centre of pixel (0, 0) is (0.0, 0.0)).
    """

    peaks: torch.Tensor
    counts: torch.Tensor
    overflow: torch.Tensor


def _edges(fg: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The 8-connected foreground pairs as one (2, E) tensor of list positions [src; dst], for
    foreground pixels `fg` given as sorted flat indices into (n, h, w); a pixel without a
    neighbour in some direction gets a self-loop there, so E = 4 * len(fg) is static. The four
    directions are computed at once: a few kernels, not a few per direction, since on a GPU
    each is a launch on the host's critical path."""
    m = fg.numel()
    ids = torch.arange(m, device=fg.device)
    position = torch.full((n * h * w,), -1, dtype=torch.int32, device=fg.device)
    position[fg] = ids.to(torch.int32)
    k = torch.arange(len(_FORWARD), device=fg.device).unsqueeze(1)  # (dy, dx) = _FORWARD[k], as arithmetic
    dy, dx = (k > 0).long(), torch.where(k == 0, 1, k - 2)
    y, x = (fg % (h * w)) // w + dy, fg % w + dx
    inside = (y < h) & (x >= 0) & (x < w)
    nb = position[torch.where(inside, fg + (dy * w + dx), fg)].long()
    return torch.stack([ids.repeat(len(_FORWARD)), torch.where(nb >= 0, nb, ids).reshape(-1)])


def _hook_and_jump(lab: torch.Tensor, edges: torch.Tensor, jumps: int) -> torch.Tensor:
    """One labelling iteration: across every edge the larger label's root adopts the smaller
    label (so a whole tree learns of its neighbour at once), then pointer jumping."""
    low, high = torch.aminmax(lab[edges], dim=0)
    targets = torch.cat([high, edges.reshape(-1)])  # the larger root, and both ends
    lab = lab.scatter_reduce(0, targets, low.repeat(3), reduce="amin")
    for _ in range(jumps):
        lab = lab[lab]
    return lab


def label_pixels(fg: torch.Tensor, n: int, h: int, w: int, check_every: int = 4,
                 jumps: int = 2) -> torch.Tensor:
    """Component of each foreground pixel (sorted flat indices `fg` into (n, h, w)), as the
    list position of its component's first pixel.

    Labels start as each pixel's own position and only ever shrink to the position of another
    pixel of the same component; at the fixed point every label names its component's first
    pixel. Hooking plus pointer jumping converges in a few dozen iterations even on long
    snakes, where plain min propagation would need one iteration per pixel of the path.
    """
    edges = _edges(fg, n, h, w)
    lab = torch.arange(fg.numel(), device=fg.device)
    while True:  # rounds of check_every iterations, the last one checked (one host wait per round)
        for _ in range(check_every - 1):
            lab = _hook_and_jump(lab, edges, jumps)
        before = lab
        lab = _hook_and_jump(lab, edges, jumps)
        if torch.equal(lab, before):  # the update is deterministic: no change means a fixed point
            return lab


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a (N, H, W) bool mask: int64, 0 = background, each
    component labelled with 1 + the flat index of its first pixel."""
    if mask.dim() != 3:
        raise ValueError(f"mask must be (N, H, W), got shape {tuple(mask.shape)}")
    n, h, w = mask.shape
    fg = mask.reshape(-1).nonzero().squeeze(1)
    out = torch.zeros(n * h * w, dtype=torch.int64, device=mask.device)
    if fg.numel():
        out[fg] = fg[label_pixels(fg, n, h, w)] + 1
    return out.view(n, h, w)


def extract_peaks(mask: torch.Tensor, signal: torch.Tensor, max_peaks: int, min_pixels: int,
                  max_pixels: int, valid: torch.Tensor | None = None) -> PeakTensors:
    """Per-component pixel count, summed signal and centroid, filtered and top-k'd per image.

    The centroid is weighted by max(signal, 0), or unweighted when a component has no positive
    signal. Components with min_pixels <= npix <= max_pixels are kept, the max_peaks brightest
    per image by summed signal; images with valid[i] False get none. All reductions run over
    the foreground pixels with index_adds and two stable sorts: no loop over images or peaks.
    """
    n, h, w = mask.shape
    hw = h * w
    dev = mask.device
    mask = mask.bool()
    if valid is not None:
        mask = mask & valid.to(dev).bool().view(n, 1, 1)
    fg = mask.reshape(-1).nonzero().squeeze(1)
    table = torch.zeros(n * max_peaks + 1, 4, device=dev, dtype=torch.float32)  # + 1: a discard row
    kept = torch.zeros(n + 1, device=dev, dtype=torch.int64)
    if fg.numel():
        root = label_pixels(fg, n, h, w)
        sig = signal.reshape(-1)[fg].float()
        ys = ((fg % hw) // w).float()
        xs = (fg % w).float()
        wgt = sig.clamp(min=0.0)
        src = torch.stack([torch.ones_like(sig), sig, wgt, wgt * ys, wgt * xs, ys, xs], dim=1)
        npix, inten, wsum, wy, wx, sy, sx = torch.zeros_like(src).index_add_(0, root, src).unbind(1)

        weighted = wsum > 0
        safe_w, safe_n = torch.where(weighted, wsum, 1.0), npix.clamp(min=1.0)
        y = torch.where(weighted, wy / safe_w, sy / safe_n)
        x = torch.where(weighted, wx / safe_w, sx / safe_n)
        ids = torch.arange(fg.numel(), device=dev)
        keep = (root == ids) & (npix >= min_pixels) & (npix <= max_pixels)
        image = torch.where(keep, fg // hw, n)  # n: not a peak, sorted last

        by_inten = torch.argsort(inten, descending=True, stable=True)
        order = by_inten[torch.argsort(image[by_inten], stable=True)]  # by image, brightest first
        kept.index_add_(0, image, torch.ones_like(image))
        first = torch.cumsum(kept, 0) - kept
        img = image[order]
        rank = ids - first[img]
        slot = torch.where((img < n) & (rank < max_peaks), img * max_peaks + rank, n * max_peaks)
        rows = torch.stack([y, x, inten, npix], dim=1)[order]
        table.index_copy_(0, slot, rows)
    kept = kept[:n]
    peaks = table[:-1].view(n, max_peaks, 4).contiguous()
    counts = kept.clamp(max=max_peaks).to(torch.int32)
    overflow = (kept - max_peaks).clamp(min=0).to(torch.int32)
    return PeakTensors(peaks, counts, overflow)
