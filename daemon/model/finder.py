"""The peak-pixel finder the pipeline runs: PeakNet or the classical finder behind one interface.

A Finder maps raw images (N, 1, H, W) float32 to a boolean peak-pixel mask (N, H, W) and the
float32 signal (N, H, W) whose sums and centroids become peak intensities and positions. It
also carries the pixel-count limits that peak extraction must apply for this kind of finder.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig, PipelineConfig
from .checkpoint import load_checkpoint, resolve_checkpoint
from .classical import ClassicalFinder
from .peaknet import PeakNet

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Finder(nn.Module):
    """Base: `forward(images) -> (mask, signal)`, plus `min_pixels` and `max_pixels`."""

    kind = "abstract"

    def __init__(self, min_pixels: int, max_pixels: int):
        super().__init__()
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def instance_normalise(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) per image, as PeakNet was trained."""
    var, mean = torch.var_mean(images, dim=(1, 2, 3), keepdim=True, correction=0)
    return (images - mean) / (var.sqrt() + eps)


class PeakNetFinder(Finder):
    """Instance normalisation -> PeakNet (autocast, channels_last, compiled as configured)
    -> peak-class probability > threshold. The signal is the raw image."""

    kind = "peaknet"

    def __init__(self, net: nn.Module, num_classes: int, threshold: float, autocast_dtype: torch.dtype | None,
                 channels_last: bool, min_pixels: int, max_pixels: int):
        super().__init__(min_pixels, max_pixels)
        self.net = net
        self.num_classes = num_classes
        self.threshold = float(threshold)
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = images.float()
        x = instance_normalise(raw)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast(x.device):
            logits = self.net(x)
        logits = logits.float()
        if self.num_classes == 1:
            prob = torch.sigmoid(logits[:, 0])
        else:
            prob = torch.softmax(logits, dim=1)[:, 1]
        return prob > self.threshold, raw[:, 0]


class ClassicalPeakFinder(Finder):
    """The classical finder; the signal is the background-subtracted image."""

    kind = "classical"

    def __init__(self, finder: ClassicalFinder, min_pixels: int, max_pixels: int):
        super().__init__(min_pixels, max_pixels)
        self.finder = finder

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finder(images.float())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device: None means plain fp32.

    On the CPU only bf16 is honoured; fp16 autocast there is slow and poorly covered, so a GPU
    config falling back to the CPU runs fp16 as fp32.
    """
    dtype = _DTYPES.get(precision)
    if dtype is None or (device.type != "cuda" and dtype is not torch.bfloat16):
        return None
    return dtype


def build_peaknet(model_cfg: ModelConfig) -> PeakNet:
    """A PeakNet of the configured size, with weights from model_cfg.checkpoint when set."""
    net = PeakNet(model_cfg.dims, model_cfg.depths, model_cfg.bifpn_blocks, model_cfg.bifpn_features,
                  model_cfg.num_classes)
    path = resolve_checkpoint(model_cfg.checkpoint)
    if path is not None:
        load_checkpoint(net, path)
    return net


def build_finder(model_cfg: ModelConfig, pipeline_cfg: PipelineConfig, device: torch.device) -> Finder:
    """The configured Finder on `device`, in eval mode."""
    device = torch.device(device)
    if model_cfg.kind == "none":
        from ..pipeline_throughput import NullFinder
        return NullFinder().to(device).eval()
    if model_cfg.kind == "classical":
        c = model_cfg.classical
        frame_shape: Sequence[int] = pipeline_cfg.frame_shape
        finder: Finder = ClassicalPeakFinder(ClassicalFinder(c, frame_shape), c.min_pixels, c.max_pixels)
        return finder.to(device).eval()
    net = build_peaknet(model_cfg).to(device).eval()
    if pipeline_cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if pipeline_cfg.compile:
        net = torch.compile(net, mode=pipeline_cfg.compile_mode)
    finder = PeakNetFinder(net, model_cfg.num_classes, model_cfg.threshold,
                           autocast_dtype(pipeline_cfg.precision, device), pipeline_cfg.channels_last,
                           pipeline_cfg.min_pixels, pipeline_cfg.max_pixels)
    return finder.to(device).eval()
