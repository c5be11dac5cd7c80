"""ConvNeXt V2 backbone (Woo et al., 2023) with the module names of Hugging Face `transformers`'
`ConvNextV2Backbone`, which the original PeakNet uses, so its state dicts load unchanged.

Same computation as that backbone in eval mode: a 4x4 stride-4 patch embedding and LayerNorm,
four stages (LayerNorm + 2x2 stride-2 conv between them), blocks of dwconv 7x7 -> LayerNorm ->
Linear 4x -> GELU -> GRN -> Linear back + residual, and a LayerNorm on each stage output. Every
LayerNorm uses eps 1e-6 (transformers fixes it there; `layer_norm_eps` of its config only feeds
the classifier head, which a backbone does not have). No drop-path: this is inference code.
Plain torch, no dict outputs or config objects: it compiles and captures into CUDA graphs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an (N, C, H, W) tensor ("channels_first" in transformers).

    Permuting to channels-last and back keeps it one layer_norm call, free when the input is
    already in channels_last memory format.
    """

    def __init__(self, channels: int, eps: float = LN_EPS):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global response normalisation on (N, H, W, C): scales each channel by its spatial L2 norm
    relative to the mean over channels (the ConvNeXt V2 fix for feature collapse)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm is taken in float32: a sum of squares over H*W overflows fp16. In fp32 this is
        # exactly transformers' computation.
        gx = torch.linalg.vector_norm(x.float(), ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight * (x * nx) + self.bias + x).to(x.dtype)


class ConvNextV2Layer(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4x -> GELU -> GRN -> Linear back, plus the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.layernorm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ConvNextV2Stage(nn.Module):
    """An optional downsampling (LayerNorm + 2x2 stride-2 conv; the first stage has none), then
    `depth` layers."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, downsample: bool):
        super().__init__()
        self.downsampling_layer = nn.ModuleList()
        if downsample:
            self.downsampling_layer.extend([LayerNorm2d(in_channels),
                                            nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=2)])
        self.layers = nn.ModuleList(ConvNextV2Layer(out_channels) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.downsampling_layer:
            x = layer(x)
        for layer in self.layers:
            x = layer(x)
        return x


class ConvNextV2Embeddings(nn.Module):
    """The patch_size x patch_size, stride patch_size conv stem and its LayerNorm."""

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int = 4):
        super().__init__()
        self.patch_embeddings = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.layernorm = LayerNorm2d(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.patch_embeddings(x))


class ConvNextV2Encoder(nn.Module):
    def __init__(self, hidden_sizes: Sequence[int], depths: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(
            ConvNextV2Stage(hidden_sizes[max(i - 1, 0)], hidden_sizes[i], depths[i], downsample=i > 0)
            for i in range(len(hidden_sizes)))


class ConvNextV2Backbone(nn.Module):
    """(N, C, H, W) -> the normalised outputs of the four stages (strides 4, 8, 16, 32)."""

    def __init__(self, hidden_sizes: Sequence[int], depths: Sequence[int], num_channels: int = 1):
        super().__init__()
        if len(hidden_sizes) != 4 or len(depths) != 4:
            raise ValueError(f"ConvNeXtV2 needs 4 hidden sizes and 4 depths, got {list(hidden_sizes)}, "
                             f"{list(depths)}")
        self.embeddings = ConvNextV2Embeddings(num_channels, hidden_sizes[0])
        self.encoder = ConvNextV2Encoder(hidden_sizes, depths)
        self.hidden_states_norms = nn.ModuleDict(
            {f"stage{i + 1}": LayerNorm2d(c) for i, c in enumerate(hidden_sizes)})
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.embeddings(x)
        feats = []
        for stage, norm in zip(self.encoder.stages, self.hidden_states_norms.values()):
            x = stage(x)
            feats.append(norm(x))
        return feats


def _init_weights(m: nn.Module) -> None:
    """transformers' initialisation: normal(0, 0.02) weights, zero biases (GRN starts at zero)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
