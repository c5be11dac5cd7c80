"""The original design's Ray object-store producers (library API, not the daemon's hot path).

`RayDataProducerManager.launch_producers` starts one Ray task per producer; each yields its
batches one by one, so consumers can start on the first batch while later ones are made. Unlike
the original (one ObjectRef per sample, owned by a worker that may exit), every batch is one
object, returned by the task and so owned by the driver: it outlives the producer's worker.
- simple producer: each object is a torch tensor (B, P, H, W);
- structured producer: each object is a `PipelineInput` with per-frame metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class PipelineInput:
    """A batch for the pipeline actors' object-store path: `image_data` (B, P, H, W) or one
    frame (P, H, W); `metadata` passes through to the results untouched."""

    image_data: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    batch_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.image_data, torch.Tensor):
            raise TypeError(f"image_data must be a torch.Tensor, got {type(self.image_data).__name__}")
        if self.image_data.ndim not in (3, 4):
            raise ValueError(f"image_data must be (B,P,H,W) or (P,H,W), got {tuple(self.image_data.shape)}")
        if not isinstance(self.metadata, dict):
            raise TypeError("metadata must be a dict")

    @property
    def frames(self) -> torch.Tensor:
        """Always (B, P, H, W)."""
        return self.image_data if self.image_data.ndim == 4 else self.image_data.unsqueeze(0)

    def __len__(self) -> int:
        return self.frames.shape[0]


def make_batch(producer_id: int, index: int, batch_size: int, tensor_shape: Sequence[int],
               structured: bool, kind: str, seed: int, dtype: torch.dtype) -> torch.Tensor | PipelineInput:
    """One batch, deterministic per (seed, producer_id, index). kind "random" draws normal noise;
    "bragg" simulates frames (structured metadata then carries their truth counts)."""
    shape = tuple(int(s) for s in tensor_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    first_seq = index * batch_size
    meta: dict[str, Any] = {"producer_id": producer_id, "batch_index": index,
                            "source": f"ray-p{producer_id}",
                            "seq": list(range(first_seq, first_seq + batch_size))}
    if kind == "bragg":
        from .bragg import BraggConfig, BraggSimulator

        sim = BraggSimulator(BraggConfig(shape=shape, dtype="float32"), seed=seed * 1000 + producer_id)
        frames = [sim.simulate(s) for s in meta["seq"]]
        data = torch.from_numpy(np.stack([f.data for f in frames])).to(dtype)
        meta["photon_energy_ev"] = [f.meta["photon_energy_ev"] for f in frames]
        meta["detector_distance_mm"] = [f.meta["detector_distance_mm"] for f in frames]
        meta["n_peaks"] = [f.meta["n_peaks"] for f in frames]
    elif kind == "random":
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, producer_id, index]).generate_state(1)[0]))
        data = torch.randn((batch_size, *shape), generator=gen).to(dtype)
        meta["photon_energy_ev"] = [9500.0] * batch_size
        meta["detector_distance_mm"] = [100.0] * batch_size
    else:
        raise ValueError(f"kind must be 'random' or 'bragg', got {kind!r}")
    meta["timestamp_ns"] = [time.time_ns()] * batch_size
    if not structured:
        return data
    return PipelineInput(image_data=data, metadata=meta, batch_id=f"p{producer_id}-b{index}")


def _produce(producer_id: int, num_batches: int, batch_size: int, tensor_shape: Sequence[int],
             structured: bool, kind: str, seed: int, dtype: torch.dtype, inter_batch_delay: float):
    for index in range(num_batches):
        if index and inter_batch_delay > 0:
            time.sleep(inter_batch_delay)  # simulated source cadence, not synchronisation
        yield make_batch(producer_id, index, batch_size, tensor_shape, structured, kind, seed, dtype)


class RayDataProducerManager:
    """Launches producer tasks that put batches into the object store (ray must be initialised)."""

    def __init__(self) -> None:
        self.batch_refs: list[list[Any]] = []

    def launch_producers(self, num_producers: int, batches_per_producer: int, batch_size: int,
                         tensor_shape: Sequence[int], inter_batch_delay: float = 0.0,
                         structured: bool = False, kind: str = "random", seed: int = 0,
                         dtype: torch.dtype = torch.float32, num_cpus: float = 1.0) -> list:
        """Returns the ObjectRefs of all batches, producer by producer; each resolves to a
        (B, P, H, W) tensor, or a PipelineInput when `structured`."""
        import ray

        if min(num_producers, batches_per_producer, batch_size) < 1:
            raise ValueError("num_producers, batches_per_producer and batch_size must be >= 1")
        task = ray.remote(num_returns=batches_per_producer, num_cpus=num_cpus)(_produce)
        self.batch_refs = []
        for pid in range(num_producers):
            refs = task.remote(pid, batches_per_producer, batch_size, tuple(tensor_shape), structured,
                               kind, seed, dtype, inter_batch_delay)
            self.batch_refs.append(list(refs) if batches_per_producer > 1 else [refs])
        return [r for refs in self.batch_refs for r in refs]

    def get_all_batches(self) -> list:
        """The launched batches' ObjectRefs, flat, in producer order."""
        return [r for refs in self.batch_refs for r in refs]
