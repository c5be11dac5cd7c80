#!/usr/bin/env python3
"""Benchmark the batch pipeline against the model's own rate and against a naive loop.

Per model (peaknet-atto, peaknet-small, classical), on whatever device this runs:
  (a)  model only: finder + peak extraction on a device-resident batch, and the bare net forward;
  (b)  our pipeline: pinned host batches -> H2D -> finder + extraction -> D2H -> host peak lists;
  (c)  a naive loop: batch 1, pageable memory, synchronous, eager fp32 (like OM's PeakNet path);
and the ratios (b)/(a) (how much of the model's rate the pipeline delivers) and (b)/(c).
`--h2d-only` measures a no-op-model pipeline's achieved H2D GB/s against a raw pinned copy.

    python tools/bench_pipeline.py                        # GPU: epix 16x352x384; CPU: 2x64x64
    python tools/bench_pipeline.py --models peaknet-atto --seconds 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from peaknet_daemon.config import Config, load_config, with_overrides
from peaknet_daemon.model import build_finder
from peaknet_daemon.pipeline import Pipeline, resolve_device, run_sequential
from peaknet_daemon.pipeline_throughput import (NullFinder, measure_h2d_bandwidth, measure_pipeline,
                                                model_only_rate, synthetic_frames)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("peaknet-atto", "peaknet-small", "classical")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated presets")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frame-shape", default="", help="P,H,W (default 16,352,384 on GPU, 2,64,64 on CPU)")
    ap.add_argument("--batch", type=int, default=0, help="frames per batch (default: config's)")
    ap.add_argument("--buffers", type=int, default=0, help="pipeline slots (default: config's)")
    ap.add_argument("--dtype", default="", help="input dtype (default: config's float32)")
    ap.add_argument("--precision", default="", help="fp32|bf16|fp16 (default: config's on GPU, fp32 on CPU)")
    ap.add_argument("--compile", choices=["on", "off", ""], default="", help="default: config's on GPU, off on CPU")
    ap.add_argument("--channels-last", choices=["on", "off", ""], default="", help="default: as --compile")
    ap.add_argument("--compile-mode", default="", help="torch.compile mode (default: config's)")
    ap.add_argument("--seconds", type=float, default=0.0, help="per measurement (default 5 GPU, 1.5 CPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's on GPU, 1 on CPU, where OpenMP spin-waits "
                         "collapse under contention on small shared machines)")
    ap.add_argument("--h2d-only", action="store_true", help="only the no-op pipeline vs raw pinned copy")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", default="", help="write all figures here")
    return ap.parse_args(argv)


def bench_config(model: str, args: argparse.Namespace, device: torch.device) -> Config:
    """configs/bench-<model>.yaml with the command line's overrides and CPU-friendly defaults."""
    cfg = load_config(ROOT / "configs" / f"bench-{model}.yaml")
    cpu = device.type == "cpu"
    ov: dict[str, Any] = {"pipeline.device": str(device)}
    shape = args.frame_shape or ("2,64,64" if cpu else "")
    if shape:
        ov["pipeline.frame_shape"] = [int(v) for v in shape.split(",")]
    if args.batch:
        ov["pipeline.batch_size"] = args.batch
    if args.buffers:
        ov["pipeline.buffers"] = args.buffers
    if args.dtype:
        ov["pipeline.dtype"] = args.dtype
    if args.precision or cpu:
        ov["pipeline.precision"] = args.precision or "fp32"
    if args.compile or cpu:
        ov["pipeline.compile"] = args.compile == "on"
    if args.compile_mode:
        ov["pipeline.compile_mode"] = args.compile_mode
    if args.channels_last or cpu:  # channels_last is slower for these nets on the CPU
        ov["pipeline.channels_last"] = args.channels_last == "on"
    return with_overrides(cfg, ov)


def bench_model_only(cfg: Config, finder: torch.nn.Module, device: torch.device, seconds: float) -> dict:
    """(a): finder + extraction, and the bare net, on a batch already on the device."""
    out = {"finder_extract_fps": model_only_rate(cfg, seconds, device, finder)}
    if getattr(finder, "net", None) is not None:
        out["net_fps"] = model_only_rate(cfg, seconds, device, finder, bare_net=True)
    return out


def bench_naive(cfg: Config, device: torch.device, seconds: float) -> float:
    """(c): one frame at a time from pageable memory, synchronous, eager fp32."""
    naive = with_overrides(cfg, {"pipeline.batch_size": 1, "pipeline.precision": "fp32",
                                 "pipeline.compile": False, "pipeline.channels_last": False})
    finder = build_finder(naive.model, naive.pipeline, device)
    frame = synthetic_frames(1, tuple(cfg.pipeline.frame_shape), cfg.pipeline.dtype)[0]
    run_sequential(naive, [frame] * 2, finder=finder, device=device)  # warm-up
    deadline = time.perf_counter() + seconds

    def frames():
        while time.perf_counter() < deadline:
            yield frame

    t0 = time.perf_counter()
    n = len(run_sequential(naive, frames(), finder=finder, device=device))
    return n / (time.perf_counter() - t0)


def bench_h2d(cfg: Config, device: torch.device, seconds: float) -> dict:
    """A no-op-model pipeline's achieved H2D rate vs a raw pinned copy of the same batch."""
    with Pipeline(cfg, device=device, finder=NullFinder().to(device)) as pipe:
        r = measure_pipeline(pipe, seconds=seconds, warmup_batches=2 * len(pipe.slots))
        batch_bytes = pipe.slots[0].host_in.nbytes
    raw = measure_h2d_bandwidth(batch_bytes, device) if device.type == "cuda" else float("nan")
    return {"noop_pipeline_gb_s": r["gb_per_s"], "noop_pipeline_fps": r["frames_per_s"],
            "raw_pinned_h2d_gb_s": raw, "ratio": r["gb_per_s"] / raw if raw == raw else float("nan"),
            "batch_bytes": batch_bytes}


def describe(cfg: Config, device: torch.device) -> str:
    pc = cfg.pipeline
    return (f"{cfg.model.preset} on {device}: frame {'x'.join(map(str, pc.frame_shape))} {pc.dtype}, "
            f"batch {pc.batch_size} frames, buffers {pc.buffers}, {pc.precision}, compile={pc.compile}"
            f"{' (' + pc.compile_mode + ')' if pc.compile else ''}, "
            f"channels_last={pc.channels_last}")


def table(cfg: Config, rows: list[tuple[str, float]]) -> str:
    p, h, w = cfg.pipeline.frame_shape
    frame_bytes = p * h * w * torch.empty((), dtype=getattr(torch, cfg.pipeline.dtype)).element_size()
    lines = [f"  {'measurement':<46}{'frames/s':>12}{'panels/s':>12}{'GB/s':>9}"]
    for name, fps in rows:
        lines.append(f"  {name:<46}{fps:>12.1f}{fps * p:>12.1f}{fps * frame_bytes / 1e9:>9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    seconds = args.seconds or (5.0 if device.type == "cuda" else 1.0)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "models": {},
                              "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    if args.h2d_only:
        cfg = bench_config("peaknet-atto", args, device)
        r = bench_h2d(cfg, device, seconds)
        report["h2d"] = r
        print(f"== no-op pipeline vs raw pinned H2D ({describe(cfg, device)})")
        print(f"  no-op pipeline {r['noop_pipeline_gb_s']:.2f} GB/s ({r['noop_pipeline_fps']:.1f} frames/s); "
              f"raw pinned copy {r['raw_pinned_h2d_gb_s']:.2f} GB/s; ratio {r['ratio']:.3f}")
    for model in [m for m in args.models.split(",") if m and not args.h2d_only]:
        cfg = bench_config(model, args, device)
        torch.manual_seed(0)
        finder = build_finder(cfg.model, cfg.pipeline, device)
        a = bench_model_only(cfg, finder, device, seconds)
        with Pipeline(cfg, device=device, finder=finder) as pipe:
            b = measure_pipeline(pipe, seconds=seconds, warmup_batches=2 * len(pipe.slots))
        c = float("nan") if args.skip_naive else bench_naive(cfg, device, seconds)
        rows = [("(a) model only: finder + extract, resident", a["finder_extract_fps"])]
        if "net_fps" in a:
            rows.append(("(a) model only: bare net forward, resident", a["net_fps"]))
        rows += [("(b) pipeline: pinned host -> host peak lists", b["frames_per_s"]),
                 ("(c) naive: batch 1, pageable, sync, eager fp32", c)]
        ba, bc = b["frames_per_s"] / a["finder_extract_fps"], b["frames_per_s"] / c
        bnet = b["frames_per_s"] / a["net_fps"] if "net_fps" in a else float("nan")
        print(f"== {describe(cfg, device)}")
        print(table(cfg, rows))
        print(f"  (b)/(a) = {ba:.3f}   (b)/(c) = {bc:.2f}"
              + (f"   (b)/(bare net) = {bnet:.3f}" if "net_fps" in a else "")
              + f"   pipeline latency p50 {b['latency_ms_p50']:.2f} ms, "
              f"p99 {b['latency_ms_p99']:.2f} ms, pinned {b['pinned_bytes'] / 2**20:.1f} MiB")
        report["models"][model] = {"config": describe(cfg, device), "model_only": a, "pipeline": b,
                                   "naive_fps": c, "b_over_a": ba, "b_over_c": bc, "b_over_net": bnet}
        if args.json:  # after every model, so a timeout keeps what was measured
            Path(args.json).write_text(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
