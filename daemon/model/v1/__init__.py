"""The first net this project trained (the shipped peaknet-atto weights): a ConvNeXtV2 encoder, a
BatchNorm BiFPN with max-pool downsampling and a pixel-shuffle head. Its state-dict names are
its own; the original PeakNet's live in the parent package. Kept so the shipped weights load."""

from .peaknet import PeakNet as PeakNetV1

__all__ = ["PeakNetV1"]
