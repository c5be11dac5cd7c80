"""Throughput measurement of a `Pipeline` (shared by its CLI, the benchmark and the profiler).

Runs the daemon's own threading pattern: the calling thread acquires and submits, a result
thread collects. Slots are filled with synthetic frames once, so the figure is the pipeline's
own rate; `fill=True` adds the per-batch host copy the ingest would do.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from .peaks import PeakTensors


def synthetic_frames(n: int, shape: tuple[int, int, int], dtype: str = "float32", seed: int = 0,
                     spots_per_panel: int = 8) -> np.ndarray:
    """(n, P, H, W) frames: Poisson-like background with a few bright Gaussian spots per panel."""
    rng = np.random.default_rng(seed)
    p, h, w = shape
    frames = rng.normal(10.0, 2.0, size=(n, p, h, w)).astype(np.float32)
    yy, xx = np.mgrid[0:7, 0:7] - 3
    spot = (400.0 * np.exp(-(yy**2 + xx**2) / 2.0)).astype(np.float32)
    if h > 8 and w > 8:
        for f in range(n):
            for q in range(p):
                ys = rng.integers(4, h - 4, spots_per_panel)
                xs = rng.integers(4, w - 4, spots_per_panel)
                for y, x in zip(ys, xs):
                    frames[f, q, y - 3:y + 4, x - 3:x + 4] += spot
    frames = np.clip(frames, 0, None)
    return frames.astype(np.dtype(dtype)) if dtype != "float32" else frames


class NullFinder(torch.nn.Module):
    """A finder that finds nothing at no cost: isolates transfers and pipeline overheads.

    `find_peaks` hands back empty PeakTensors directly, so not even extraction runs.
    """

    min_pixels = 1
    max_pixels = 1

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signal = images[:, 0]
        return torch.zeros_like(signal, dtype=torch.bool), signal

    def find_peaks(self, images: torch.Tensor, valid: torch.Tensor, max_peaks: int) -> PeakTensors:
        n, dev = images.shape[0], images.device
        return PeakTensors(torch.zeros((n, max_peaks, 4), dtype=torch.float32, device=dev),
                           torch.zeros((n,), dtype=torch.int32, device=dev),
                           torch.zeros((n,), dtype=torch.int32, device=dev))


def measure_h2d_bandwidth(nbytes: int, device: torch.device | str, reps: int = 20) -> float:
    """Raw pinned host -> device copy bandwidth in GB/s (1e9 bytes/s), timed with CUDA events."""
    dev = torch.device(device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)
    with torch.cuda.device(dev), torch.cuda.stream(stream):
        for _ in range(3):
            dst.copy_(host, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            dst.copy_(host, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9


def call_rate(fn: Callable[[], Any], seconds: float, device: torch.device, warmup: int = 3) -> float:
    """Calls per second of `fn`, launched back to back; the device is synchronised at the ends."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls / (time.perf_counter() - t0)


def model_only_rate(cfg: Any, seconds: float = 5.0, device: torch.device | str | None = None,
                    finder: Optional[torch.nn.Module] = None, bare_net: bool = False) -> float:
    """Frames/s of finder + extraction (or, with bare_net, the finder's net alone) on a batch
    already on the device: the model's own rate, which the pipeline should approach."""
    from .model import build_finder
    from .pipeline import compute_batch, resolve_device

    pc = cfg.pipeline
    dev = resolve_device(device if device is not None else pc.device)
    finder = finder if finder is not None else build_finder(cfg.model, pc, dev)
    b, (p, h, w) = pc.batch_size, pc.frame_shape
    raw = torch.from_numpy(synthetic_frames(b, (p, h, w), pc.dtype)).to(dev)
    valid = torch.ones(b * p, dtype=torch.bool, device=dev)
    with torch.inference_mode():
        if not bare_net:
            return call_rate(lambda: compute_batch(finder, raw, valid, pc.max_peaks), seconds, dev) * b
        net = finder.net
        images = raw.reshape(b * p, 1, h, w).to(torch.float32)
        if pc.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pc.precision)

        def forward() -> Any:
            with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                return net(images)

        return call_rate(forward, seconds, dev) * b


def measure_pipeline(pipe: Any, seconds: float = 5.0, warmup_batches: int = 4, fill: bool = False,
                     source: np.ndarray | None = None) -> dict:
    """Steady-state frames/s of `pipe` over `seconds`, with submit and collect on two threads."""
    p, h, w = pipe.frame_shape
    b = pipe.batch_size
    if source is None:
        source = synthetic_frames(b, (p, h, w), str(pipe.slots[0].frames.dtype))
    for slot in pipe.slots:  # pre-fill every slot once
        slot.frames[:] = source[:b]
    for _ in range(warmup_batches):  # compile, autotune, allocator warm-up
        pipe.submit(pipe.acquire(), b, list(range(b)))
        pipe.drain()

    latencies: list[float] = []
    frames_done = [0, 0.0]  # count, last done_at

    def result_loop(stop: threading.Event) -> None:
        while not (stop.is_set() and pipe.in_flight() == 0):
            for r in pipe.collect(timeout=0.05):
                frames_done[0] += len(r.frames)
                frames_done[1] = r.done_at
                latencies.append(r.done_at - r.submitted_at)

    stop = threading.Event()
    collector = threading.Thread(target=result_loop, args=(stop,), name="collect", daemon=True)
    collector.start()
    t0 = time.perf_counter()
    batches = 0
    while time.perf_counter() - t0 < seconds:
        slot = pipe.acquire()
        if fill:
            np.copyto(slot.frames, source[:b])
        pipe.submit(slot, b, list(range(b)))
        batches += 1
    stop.set()
    collector.join()
    elapsed = frames_done[1] - t0
    fps = frames_done[0] / elapsed if elapsed > 0 else 0.0
    frame_bytes = p * h * w * pipe.slots[0].frames.itemsize if pipe.slots else 0
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return {"device": str(pipe.device), "frame_shape": [p, h, w], "batch_size": b,
            "buffers": len(pipe.slots), "frames": frames_done[0], "seconds": elapsed,
            "frames_per_s": fps, "panels_per_s": fps * p, "gb_per_s": fps * frame_bytes / 1e9,
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
            "pinned_bytes": pipe.pinned_bytes, "fill": fill}


def format_report(r: dict) -> str:
    return (f"{r.get('config', '')} device={r['device']} frame={tuple(r['frame_shape'])} "
            f"batch={r['batch_size']} buffers={r['buffers']}\n"
            f"  {r['frames_per_s']:.1f} frames/s  {r['panels_per_s']:.1f} panels/s  "
            f"{r['gb_per_s']:.3f} GB/s in  latency p50 {r['latency_ms_p50']:.2f} ms "
            f"p99 {r['latency_ms_p99']:.2f} ms  ({r['frames']} frames in {r['seconds']:.2f} s, "
            f"pinned {r['pinned_bytes'] / 2**20:.1f} MiB)")
