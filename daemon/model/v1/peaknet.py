"""PeakNet v1 (this project's first net): ConvNeXtV2 encoder + BiFPN + a per-pixel segmentation head.

The head works on the finest BiFPN level (stride 4) and returns logits at the input resolution.
It upsamples with a learned sub-pixel convolution (pixel shuffle) rather than bilinear
interpolation: Bragg peaks are a few pixels wide, and a bilinear blow-up of stride-4 logits
would smear them over 4x4 blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bifpn import BiFPN, SeparableConv
from .convnextv2 import ConvNeXtV2Encoder

STRIDE = 32  # the coarsest level's stride: inputs are padded to a multiple of it


class SegHead(nn.Module):
    """Separable conv, then a 1x1 conv to num_classes * 4 * 4 channels and a pixel shuffle."""

    def __init__(self, channels: int, num_classes: int, upscale: int = 4):
        super().__init__()
        self.conv = SeparableConv(channels)
        self.out = nn.Conv2d(channels, num_classes * upscale * upscale, 1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.out(self.conv(x)))


class PeakNet(nn.Module):
    """(N, 1, H, W) normalised images -> (N, num_classes, H, W) logits, for any H, W."""

    def __init__(self, dims: Sequence[int], depths: Sequence[int], bifpn_blocks: int,
                 bifpn_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = ConvNeXtV2Encoder(dims, depths, in_channels=1)
        self.bifpn = BiFPN(dims, bifpn_features, bifpn_blocks)
        self.head = SegHead(bifpn_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pad_h, pad_w = (-h) % STRIDE, (-w) % STRIDE
        if pad_h or pad_w:
            # Zero is the mean of a normalised image, the least surprising fill.
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.bifpn(self.encoder(x))
        logits = self.head(feats[0])
        return logits[..., :h, :w]
