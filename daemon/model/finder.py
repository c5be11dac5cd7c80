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

from ..config import ARCH_KEYS, ModelConfig, PipelineConfig
from .checkpoint import load_checkpoint, resolve_checkpoint
from .classical import ClassicalFinder
from .peaknet import PeakNet
from .v1 import PeakNetV1

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
    """(x - mean) / (std + eps) per image, as the nets trained here were trained."""
    var, mean = torch.var_mean(images, dim=(1, 2, 3), keepdim=True, correction=0)
    return (images - mean) / (var.sqrt() + eps)


def normalise(images: torch.Tensor, mode: str, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """The input scaling of model.normalisation: 'instance', 'none' (raw values, as the original
    pipeline feeds them) or 'fixed' ((x - mean) / std, e.g. a detector's own statistics)."""
    if mode == "instance":
        return instance_normalise(images)
    if mode == "fixed":
        return (images - mean) / std
    if mode == "none":
        return images
    raise ValueError(f"unknown normalisation {mode!r}")


class PeakNetFinder(Finder):
    """Input normalisation -> PeakNet (autocast, channels_last, compiled as configured)
    -> peak-class probability > threshold. The signal is the raw image."""

    kind = "peaknet"

    def __init__(self, net: nn.Module, num_classes: int, threshold: float, autocast_dtype: torch.dtype | None,
                 channels_last: bool, min_pixels: int, max_pixels: int, normalisation: str = "instance",
                 norm_mean: float = 0.0, norm_std: float = 1.0):
        super().__init__(min_pixels, max_pixels)
        self.net = net
        self.num_classes = num_classes
        self.threshold = float(threshold)
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        normalise(torch.zeros(1, 1, 1, 1), normalisation)  # fail here, not on the first batch
        self.normalisation, self.norm_mean, self.norm_std = normalisation, float(norm_mean), float(norm_std)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = images.float()
        x = normalise(raw, self.normalisation, self.norm_mean, self.norm_std)
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


def arch_of(model_cfg: ModelConfig) -> dict:
    """The configured architecture keys (what a checkpoint must match)."""
    return {k: getattr(model_cfg, k) for k in ARCH_KEYS}


def build_net(model_cfg: ModelConfig) -> nn.Module:
    """A PeakNet of the configured architecture and size, randomly initialised."""
    m = model_cfg
    if m.architecture == "original":
        return PeakNet(m.backbone_hidden_sizes, m.backbone_depths, m.bifpn_num_blocks, m.bifpn_num_features,
                       m.seg_out_channels, m.num_classes, m.uses_learned_upsample)
    return PeakNetV1(m.backbone_hidden_sizes, m.backbone_depths, m.bifpn_num_blocks, m.bifpn_num_features,
                     m.num_classes)


RANDOM_WEIGHTS_SEED = 0  # the draw of a net run without a checkpoint (benchmarks)


def build_peaknet(model_cfg: ModelConfig) -> nn.Module:
    """build_net, with weights from model_cfg.checkpoint when set. Without a checkpoint the
    random weights are drawn from RANDOM_WEIGHTS_SEED, the same in every process: which pixels
    a random net marks, and so what extraction costs, depends on its draw, and benchmarks of
    random-weight nets must measure the same net every time (README, Runtime, has how much the
    draw mattered)."""
    path = resolve_checkpoint(model_cfg.checkpoint)
    if path is not None:
        net = build_net(model_cfg)
        load_checkpoint(net, path, arch_of(model_cfg))
        return net
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return build_net(model_cfg)


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
                           pipeline_cfg.min_pixels, pipeline_cfg.max_pixels, model_cfg.normalisation,
                           model_cfg.norm_mean, model_cfg.norm_std)
    return finder.to(device).eval()
