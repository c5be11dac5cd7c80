"""peaknet-daemon: real-time Bragg-peak finding for serial crystallography.

Frames arrive on ZeroMQ; one Ray pipeline actor per GPU runs PeakNet or a classical finder in
an N-way buffered H2D -> compute -> D2H pipeline and emits compact peak lists.
Library entry points: `create_pipeline_actors` (Ray), `Pipeline` (one device, in-process).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "create_pipeline_actors", "Pipeline", "load_config"]


def __getattr__(name: str):
    # Lazy: importing the package must not import torch or ray (the CLI's --check stays fast).
    if name == "create_pipeline_actors":
        from .actor import create_pipeline_actors
        return create_pipeline_actors
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    if name == "load_config":
        from .config import load_config
        return load_config
    raise AttributeError(name)
