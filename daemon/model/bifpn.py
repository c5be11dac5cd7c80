"""The original PeakNet's BiFPN over four levels, with its module names (`blocks.N.w_m`,
`blocks.N.w_q`, `blocks.N.w_q_mask`, `blocks.N.conv.m4..m6` and `q5..q7`).

The original numbers the levels 4..7 (finest first). Each block runs
- pathway M, coarse to fine: m_l = conv_m_l((w1 p_l + w2 up(m_{l+1})) / (w1 + w2 + eps)) + p_l,
  starting from m_7 = p_7;
- pathway Q, fine to coarse: q_l = conv_q_l((w1 p_l + w2 m_l + w3 down(q_{l-1})) / (sum w + eps))
  + p_l, starting from q_4 = m_4, where the coarsest level has no m_7 of its own: it uses p_7,
  and the mask zeroes its p_7 weight so that p_7 is not counted twice;
with up/down bilinear x2 / x0.5 (computed in float32, as the original does), and every conv a
1x1 depthwise + 1x1 pointwise conv (no bias), a channel LayerNorm (eps 1e-6) and GELU.
The fusion weights are used as stored (no ReLU), times the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convnextv2 import LayerNorm2d

FUSION_EPS = 1e-5  # the original pipeline's FusionConfig(eps=1e-5)
LEVELS = (4, 5, 6, 7)


def resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize by `scale` in float32, back in x's dtype (the original's numerics)."""
    return F.interpolate(x.float(), scale_factor=scale, mode="bilinear", align_corners=False).to(x.dtype)


class DepthwiseSeparableConv2d(nn.Module):
    """A per-channel conv, then a 1x1 conv across channels (kernel 1 and no bias in the BiFPN)."""

    def __init__(self, channels: int, kernel_size: int = 1):
        super().__init__()
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                        groups=channels, bias=False)
        self.pointwise_conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def _fusion_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(DepthwiseSeparableConv2d(channels), LayerNorm2d(channels), nn.GELU())


class BiFPNBlock(nn.Module):
    """One M (top-down) + Q (bottom-up) pass over the four levels."""

    def __init__(self, channels: int):
        super().__init__()
        n = len(LEVELS) - 1
        self.conv = nn.ModuleDict()
        self.conv.update({f"m{level}": _fusion_conv(channels) for level in LEVELS[:-1]})
        self.conv.update({f"q{level}": _fusion_conv(channels) for level in LEVELS[1:]})
        self.w_m = nn.Parameter(torch.ones(n, 2))
        mask = torch.ones(n, 3, dtype=torch.bool)
        mask[-1, 0] = False  # the coarsest Q node: its "m" input is p itself
        self.register_buffer("w_q_mask", mask)
        self.w_q = nn.Parameter(torch.ones(n, 3) * mask)

    def forward(self, p: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(LEVELS)
        w_m = self.w_m
        w_q = self.w_q * self.w_q_mask
        m: list[torch.Tensor] = [p[0]] * n  # filled coarse to fine below
        m[n - 1] = p[n - 1]
        for i in range(n - 2, -1, -1):  # idx in the original's M loop = n - 2 - i
            w1, w2 = w_m[n - 2 - i, 0], w_m[n - 2 - i, 1]
            fused = (w1 * p[i] + w2 * resize(m[i + 1], 2.0)) / (w1 + w2 + FUSION_EPS)
            m[i] = self.conv[f"m{LEVELS[i]}"](fused) + p[i]
        q = [m[0]]
        for i in range(1, n):
            w1, w2, w3 = w_q[i - 1, 0], w_q[i - 1, 1], w_q[i - 1, 2]
            fused = (w1 * p[i] + w2 * m[i] + w3 * resize(q[i - 1], 0.5)) / (w1 + w2 + w3 + FUSION_EPS)
            q.append(self.conv[f"q{LEVELS[i]}"](fused) + p[i])
        return q


class BiFPN(nn.Module):
    """`num_blocks` BiFPN blocks in sequence over equal-width levels."""

    def __init__(self, channels: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*(BiFPNBlock(channels) for _ in range(num_blocks)))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.blocks(feats)
