"""Peak-pixel finders: PeakNet (the original's architecture, and this project's v1) and a classical
peakfinder8-style finder."""

from .checkpoint import (CheckpointError, infer_architecture, load_checkpoint, resolve_checkpoint,
                         save_checkpoint)
from .classical import ClassicalFinder
from .finder import (ClassicalPeakFinder, Finder, PeakNetFinder, build_finder, build_net, instance_normalise,
                     normalise)
from .peaknet import PeakNet
from .v1 import PeakNetV1

__all__ = [
    "CheckpointError", "ClassicalFinder", "ClassicalPeakFinder", "Finder", "PeakNet", "PeakNetFinder",
    "PeakNetV1", "build_finder", "build_net", "infer_architecture", "instance_normalise", "load_checkpoint",
    "normalise", "resolve_checkpoint", "save_checkpoint",
]
