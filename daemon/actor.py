"""The Ray side of a worker: `PipelineActor` (one per GPU, restarted by Ray) and the original
design's library API, `create_pipeline_actors`.

Ray gives lifecycle, GPU assignment, restarts and placement; frames never travel through the
object store on the daemon's hot path (each actor pulls its own ZMQ sockets). The object-store
method exists for users who drive the pipeline from Python.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import ray

from .config import Config, config_from_dict, with_overrides


class PipelineActor:
    """Ray actor body: builds a `Worker` in the actor process. Ray re-runs `__init__` when the
    process dies (max_restarts), so a restarted actor reconnects and resumes by itself."""

    def __init__(self, cfg: Config, index: int, ingest: bool = True, tally_dir: str | None = None):
        from .log import configure_logging
        configure_logging(cfg.logging)
        _limit_cpu_threads()
        from .worker import Worker
        self.worker = Worker(cfg, index, ingest=ingest, tally_dir=tally_dir)

    def ready(self) -> dict:
        return {**self.worker.ready(), "node": ray.get_runtime_context().get_node_id()}

    def stats(self) -> dict:
        return self.worker.stats()

    def close_run(self, run: Any) -> list[str]:
        return self.worker.close_run(run)

    def stop(self) -> dict:
        return self.worker.stop()

    def process_batch_from_ray_object_store(self, refs: Sequence[Any]) -> list[list[dict]]:
        """Peaks for batches held in the object store: each item an ObjectRef (or value) of a
        tensor/array (B,P,H,W) or (P,H,W), or a `PipelineInput`. One result list per item."""
        items = [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in refs]
        out = []
        for item in items:
            data, meta = _unpack(item)
            results = self.worker.process_batch(data)
            for r in results:
                r["meta"] = meta
            out.append(results)
        return out


def _unpack(item: Any) -> tuple[np.ndarray, dict]:
    if hasattr(item, "image_data"):  # PipelineInput of peaknet_producers.ray_producers
        meta = dict(getattr(item, "metadata", {}) or {})
        meta.setdefault("batch_id", getattr(item, "batch_id", None))
        item = item.image_data
    else:
        meta = {}
    if hasattr(item, "detach"):
        item = item.detach().cpu().numpy()
    return np.asarray(item), meta


def _limit_cpu_threads() -> None:
    """Without a GPU, keep torch to the CPUs Ray gave this actor."""
    import torch
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


NON_TEMPORAL = "glibc.cpu.x86_non_temporal_threshold"


def glibc_tunables(cfg: Config, inherited: str = "") -> str:
    """GLIBC_TUNABLES for an actor process and the ingest processes it starts.

    Each ingest process copies every payload once into a batch slot that the GPU reads much
    later: megabytes that would only evict the caches. From glibc's non-temporal threshold up,
    memcpy streams to memory (no read of the destination first, caches untouched). glibc derives
    its default from the cache sizes, and on the H200 machines it left 8.65 MB frames cached:
    streaming them moved up to 1.4x the frames (README, Runtime). The user's own tunables are
    kept, a threshold of theirs included; CPUs other than x86 ignore the name."""
    if not cfg.ingest.streaming_copy_bytes or NON_TEMPORAL + "=" in inherited:
        return inherited
    ours = f"{NON_TEMPORAL}={cfg.ingest.streaming_copy_bytes}"
    return f"{inherited}:{ours}" if inherited else ours


def actor_options(cfg: Config, use_gpu: bool, spread: bool = True) -> dict:
    """Ray options for one pipeline actor."""
    options: dict[str, Any] = {"max_restarts": cfg.ray.max_restarts, "max_concurrency": 4}
    options.update({"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_gpus": 0, "num_cpus": cfg.gpus.cpu_threads})
    if spread:
        options["scheduling_strategy"] = "SPREAD"
    tunables = glibc_tunables(cfg, os.environ.get("GLIBC_TUNABLES", ""))
    if tunables:  # read by the dynamic loader at exec: Ray starts the actor's process with it
        options["runtime_env"] = {"env_vars": {"GLIBC_TUNABLES": tunables}}
    return options


def create_pipeline_actors(num_actors: int = 1, config: Config | dict | None = None,
                           frame_shape: Sequence[int] | None = None, use_gpu: bool | None = None,
                           ingest: bool = False, **overrides: Any) -> list[Any]:
    """Start `num_actors` pipeline actors (the original design's API). Without `ingest` they
    only serve `process_batch_from_ray_object_store`. Needs `ray.init()` first (or starts a local
    instance). Keyword overrides use dotted keys with '__' for '.', e.g. pipeline__batch_size=8."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    cfg = config if isinstance(config, Config) else config_from_dict(config or {}, "<create_pipeline_actors>")
    flat = {k.replace("__", "."): v for k, v in overrides.items()}
    if frame_shape is not None:
        flat["pipeline.frame_shape"] = list(frame_shape)
    if flat:
        cfg = with_overrides(cfg, flat)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if not ingest:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, results_endpoint="", cxi_dir=""))
    remote_cls = ray.remote(PipelineActor)
    return [remote_cls.options(**actor_options(cfg, use_gpu)).remote(cfg, i, ingest)
            for i in range(num_actors)]
