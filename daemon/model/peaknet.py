"""PeakNet as the original `peaknet` package defines it: ConvNeXtV2 backbone -> 1x1 convs to the
BiFPN width -> BiFPN -> segmentation head, with the original's state-dict names.

The head: each BiFPN level goes through a lateral stack of (3x3 conv, GroupNorm(32), GELU,
bilinear x2) layers until it reaches stride 4 (the stride-4 level gets one conv and no
upsampling); the four results are summed; a 1x1 conv gives the class logits at stride 4,
upsampled x4 bilinearly. With `uses_learned_upsample`, a ConvTranspose2d (kernel 6, stride 4,
padding 1) of the summed features is added to those logits.

Inputs are padded to a multiple of 32 (bottom and right, with zeros) and the logits cropped back,
so any H, W works; the original requires the multiple itself.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bifpn import BiFPN, resize
from .convnextv2 import ConvNextV2Backbone

STRIDE = 32  # the coarsest level's stride
HEAD_STRIDE = 4  # the finest level's stride, where the head predicts
GROUPS = 32  # GroupNorm groups of the head (the original's SegHeadConfig.num_groups)


class SegLateralLayer(nn.Module):
    """`num_upsamples` x (3x3 conv, GroupNorm, GELU, bilinear x2); one conv without upsampling
    when num_upsamples is 0."""

    def __init__(self, in_channels: int, out_channels: int, num_upsamples: int):
        super().__init__()
        self.upsamples = num_upsamples > 0
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                          nn.GroupNorm(GROUPS, out_channels), nn.GELU())
            for i in range(max(num_upsamples, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            if self.upsamples:
                x = resize(x, 2.0)
        return x


class PeakNet(nn.Module):
    """(N, 1, H, W) images -> (N, num_classes, H, W) logits, for any H, W."""

    def __init__(self, backbone_hidden_sizes: Sequence[int], backbone_depths: Sequence[int],
                 bifpn_num_blocks: int, bifpn_num_features: int, seg_out_channels: int, num_classes: int,
                 uses_learned_upsample: bool = False, num_channels: int = 1):
        super().__init__()
        if seg_out_channels % GROUPS:
            raise ValueError(f"seg_out_channels must be a multiple of {GROUPS} (GroupNorm groups), "
                             f"got {seg_out_channels}")
        self.num_classes = num_classes
        self.backbone = ConvNextV2Backbone(backbone_hidden_sizes, backbone_depths, num_channels)
        self.backbone_to_bifpn = nn.ModuleList(nn.Conv2d(c, bifpn_num_features, 1) for c in backbone_hidden_sizes)
        self.bifpn = BiFPN(bifpn_num_features, bifpn_num_blocks)
        self.seg_lateral_layers = nn.ModuleList(
            SegLateralLayer(bifpn_num_features, seg_out_channels, i) for i in range(len(backbone_hidden_sizes)))
        self.head_segmask = nn.Conv2d(seg_out_channels, num_classes, 1)
        if uses_learned_upsample:
            # (n - 1) * 4 - 2 + 6 = 4 n: exactly the stride-4 -> stride-1 size.
            self.head_upsample_layer = nn.Sequential(
                nn.ConvTranspose2d(seg_out_channels, num_classes, HEAD_STRIDE + 2, stride=HEAD_STRIDE, padding=1))
        else:
            self.head_upsample_layer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pad_h, pad_w = (-h) % STRIDE, (-w) % STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = [proj(f) for proj, f in zip(self.backbone_to_bifpn, self.backbone(x))]
        feats = self.bifpn(feats)
        acc = self.seg_lateral_layers[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):  # coarse to fine, as the original sums
            acc = acc + self.seg_lateral_layers[i](feats[i])
        logits = resize(self.head_segmask(acc), float(HEAD_STRIDE))
        if self.head_upsample_layer is not None:
            logits = logits + self.head_upsample_layer(acc)
        return logits[..., :h, :w]
