"""ConvNeXt V2 encoder (Woo et al., 2023) for single-channel detector images.

Returns the four stage outputs (strides 4, 8, 16, 32) for the BiFPN; there is no classifier head
and no drop-path (this is an inference daemon; the trainer does not need stochastic depth for
the small presets).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an (N, C, H, W) tensor.

    Permuting to channels-last and back keeps it one fused layer_norm call, and is free when the
    input is already in channels_last memory format.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global response normalisation on (N, H, W, C): boosts channels with a large spatial L2
    norm relative to the others (the ConvNeXt V2 fix for feature collapse)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm is taken in float32: a sum of squares over H*W overflows fp16.
        gx = torch.linalg.vector_norm(x.float(), ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return (self.gamma * (x * nx) + self.beta + x).to(x.dtype)


class Block(nn.Module):
    """dwconv 7x7 -> LN -> Linear 4x -> GELU -> GRN -> Linear back, plus the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2Encoder(nn.Module):
    """Stem (4x4 stride-4 conv + LN), then 4 stages separated by LN + 2x2 stride-2 convs."""

    def __init__(self, dims: Sequence[int], depths: Sequence[int], in_channels: int = 1):
        super().__init__()
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"ConvNeXtV2 needs 4 dims and 4 depths, got {list(dims)}, {list(depths)}")
        self.dims = list(dims)
        self.downsample = nn.ModuleList()
        self.downsample.append(nn.Sequential(
            nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6)))
        for i in range(3):
            self.downsample.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(dims[i]) for _ in range(depths[i]))) for i in range(4))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
            feats.append(x)
        return feats


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
