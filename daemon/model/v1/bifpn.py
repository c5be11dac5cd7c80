"""BiFPN (Tan et al., EfficientDet) over the four encoder levels.

Each block runs a top-down then a bottom-up path; every fused node combines its inputs with
learned, non-negative, normalised weights ("fast normalised fusion") and a depthwise-separable
conv. Levels must halve exactly in size, which PeakNet guarantees by padding to a multiple of 32.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SeparableConv(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 + BatchNorm + SiLU: the cheap conv of every fusion node."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.pointwise(self.depthwise(x))))


class Fusion(nn.Module):
    """sum_i relu(w_i) * x_i / (sum_i relu(w_i) + eps), then a separable conv."""

    def __init__(self, n_inputs: int, channels: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_inputs))
        self.eps = eps
        self.conv = SeparableConv(channels)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        fused = inputs[0] * w[0].to(inputs[0].dtype)
        for i in range(1, len(inputs)):
            fused = fused + inputs[i] * w[i].to(inputs[i].dtype)
        return self.conv(fused)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=2, stride=2)


class BiFPNBlock(nn.Module):
    """One top-down + bottom-up pass over L levels (finest first)."""

    def __init__(self, channels: int, levels: int = 4):
        super().__init__()
        self.levels = levels
        # top-down nodes for levels L-2 .. 0: (input, upsampled coarser)
        self.td = nn.ModuleList(Fusion(2, channels) for _ in range(levels - 1))
        # bottom-up nodes for levels 1 .. L-1: (input, top-down, downsampled finer); the coarsest
        # level has no top-down node, so it fuses two inputs.
        self.bu = nn.ModuleList(Fusion(3 if i < levels - 1 else 2, channels) for i in range(1, levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        n = self.levels
        td = [None] * n
        td[n - 1] = feats[n - 1]
        for i in range(n - 2, -1, -1):
            td[i] = self.td[i]([feats[i], _up(td[i + 1])])
        out = [td[0]]
        for i in range(1, n):
            inputs = [feats[i], td[i], _down(out[i - 1])] if i < n - 1 else [feats[i], _down(out[i - 1])]
            out.append(self.bu[i - 1](inputs))
        return out


class BiFPN(nn.Module):
    """1x1 projections of the encoder levels to `channels`, then `blocks` BiFPN blocks."""

    def __init__(self, in_dims: Sequence[int], channels: int, blocks: int):
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, channels, 1, bias=False), nn.BatchNorm2d(channels)) for d in in_dims)
        self.blocks = nn.ModuleList(BiFPNBlock(channels, len(in_dims)) for _ in range(blocks))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [p(f) for p, f in zip(self.proj, feats)]
        for block in self.blocks:
            x = block(x)
        return x
