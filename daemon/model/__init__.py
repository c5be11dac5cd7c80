"""Peak-pixel finders: PeakNet (ConvNeXtV2 + BiFPN) and a classical peakfinder8-style finder."""

from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from .classical import ClassicalFinder
from .finder import ClassicalPeakFinder, Finder, PeakNetFinder, build_finder, instance_normalise
from .peaknet import PeakNet

__all__ = [
    "CheckpointError", "ClassicalFinder", "ClassicalPeakFinder", "Finder", "PeakNet", "PeakNetFinder",
    "build_finder", "instance_normalise", "load_checkpoint", "resolve_checkpoint", "save_checkpoint",
]
