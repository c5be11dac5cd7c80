#!/usr/bin/env python3
"""Profile the pipeline over a list of named experiments (config overrides), one report each.

Each experiment runs `python -m peaknet_daemon.pipeline` on its resolved config under
`nsys profile` (CUDA + NVTX + OS runtime traces, then `nsys stats` summaries) when nsys works
here; otherwise in-process under `torch.profiler` (a Chrome trace and a key-averages table).
Every experiment gets a folder in --out; a summary table (text and JSON) compares them.

    python tools/profile_experiments.py --out prof/                       # built-in list, GPU
    python tools/profile_experiments.py --experiments exps.yaml --only atto-bf16,atto-fp32
    python tools/profile_experiments.py --set pipeline.frame_shape=[2,64,64] \\
        --set pipeline.compile=false --seconds 1 --only atto-fp32-eager   # quick, on a CPU

An experiments YAML: `experiments: [{name: NAME, config: PATH (optional), overrides: {KEY: VALUE}}]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from peaknet_daemon.config import Config, dump_yaml, load_config, with_overrides
from peaknet_daemon.pipeline import Pipeline, parse_override, resolve_device
from peaknet_daemon.pipeline_throughput import measure_pipeline

ROOT = Path(__file__).resolve().parent.parent
BASE = "configs/bench-peaknet-atto.yaml"

BUILTIN: list[dict[str, Any]] = [
    {"name": "atto-bf16-compiled", "overrides": {}},
    {"name": "atto-fp32-eager", "overrides": {"pipeline.precision": "fp32", "pipeline.compile": False,
                                              "pipeline.channels_last": False}},
    {"name": "atto-buffers2", "overrides": {"pipeline.buffers": 2}},
    {"name": "atto-batch8", "overrides": {"pipeline.batch_size": 8}},
    {"name": "atto-uint16", "overrides": {"pipeline.dtype": "uint16"}},
    {"name": "small-bf16-compiled", "config": "configs/bench-peaknet-small.yaml", "overrides": {}},
    {"name": "classical", "config": "configs/bench-classical.yaml", "overrides": {}},
]

NSYS_REPORTS = [("nvtx_sum", "nvtxsum"), ("cuda_gpu_kern_sum", "gpukernsum"),
                ("cuda_gpu_mem_time_sum", "gpumemtimesum"), ("cuda_api_sum", "cudaapisum")]


def nsys_works() -> bool:
    """nsys is on PATH, answers --version, and there is a GPU to trace."""
    exe = shutil.which("nsys")
    if not exe or not torch.cuda.is_available():
        return False
    try:
        return subprocess.run([exe, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def load_experiments(path: str) -> list[dict[str, Any]]:
    if not path:
        return BUILTIN
    data = yaml.safe_load(Path(path).read_text()) or {}
    exps = data.get("experiments", data) if isinstance(data, dict) else data
    if not isinstance(exps, list) or not all(isinstance(e, dict) and "name" in e for e in exps):
        raise SystemExit(f"{path}: expected 'experiments: [{{name: ..., overrides: {{...}}}}]'")
    return exps


def resolve(exp: dict[str, Any], base: str, common: dict[str, Any]) -> Config:
    cfg = load_config(ROOT / exp.get("config", base))
    return with_overrides(cfg, {**(exp.get("overrides") or {}), **common})


def run_nsys(name: str, cfg_path: Path, folder: Path, args: argparse.Namespace) -> dict:
    """The pipeline CLI under nsys, then `nsys stats` text summaries."""
    trace = folder / "trace"
    tp_json = folder / "throughput.json"
    cmd = ["nsys", "profile", "--trace=cuda,nvtx,osrt", "--sample=none", "--force-overwrite=true",
           "-o", str(trace), sys.executable, "-m", "peaknet_daemon.pipeline", "--config", str(cfg_path),
           "--seconds", str(args.seconds), "--json", str(tp_json), "--gpu-id", str(args.gpu_id)]
    log = folder / "nsys.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    rep = next((p for p in (trace.with_suffix(".nsys-rep"), trace.with_suffix(".qdrep")) if p.exists()), None)
    summary = folder / "summary.txt"
    if rep is not None:
        with summary.open("w") as fh:
            for new, old in NSYS_REPORTS:  # report names changed across nsys versions
                for r in (new, old):
                    res = subprocess.run(["nsys", "stats", "--report", r, "--format", "column", str(rep)],
                                         capture_output=True, text=True, timeout=args.timeout)
                    if res.returncode == 0 and res.stdout.strip():
                        fh.write(f"### {r}\n{res.stdout}\n")
                        break
    out = json.loads(tp_json.read_text()) if tp_json.exists() else {}
    out.update({"backend": "nsys", "rc": rc, "trace": str(rep) if rep else "", "summary": str(summary)})
    return out


def run_torch_profiler(cfg: Config, folder: Path, args: argparse.Namespace) -> dict:
    """In process: a throughput run, then a few batches under torch.profiler."""
    device = resolve_device(f"cuda:{args.gpu_id}" if torch.cuda.is_available() else cfg.pipeline.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with Pipeline(cfg, device=device) as pipe:
        out = measure_pipeline(pipe, seconds=args.seconds, warmup_batches=2 * len(pipe.slots))
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            measure_pipeline(pipe, seconds=min(args.seconds, 1.0), warmup_batches=0)
    trace = folder / "trace.json"
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    summary = folder / "summary.txt"
    timeline = gpu_timeline(json.loads(trace.read_text()))
    summary.write_text(format_timeline(timeline) + "\n\n" + prof.key_averages().table(sort_by=sort, row_limit=30))
    out.update({"backend": "torch.profiler", "rc": 0, "trace": str(trace), "summary": str(summary),
                "timeline": timeline})
    return out


DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _tally(pairs: Iterable[tuple[str, float]]) -> dict[str, list[float]]:
    """key -> [count, summed duration] of (key, duration) pairs."""
    out: dict[str, list[float]] = {}
    for key, dur in pairs:
        row = out.setdefault(key, [0, 0.0])
        row[0] += 1
        row[1] += dur
    return out


def gpu_timeline(trace: dict) -> dict[str, Any]:
    """What a Chrome trace of torch.profiler says about the device's use, so that a run can tell
    "the device is busy all the time" (its own speed is the limit) from "the device waits for
    the host" (launches, host waits or an empty queue are): busy fraction of the traced window,
    device time per stream, idle gaps, and the host's time per pipeline stage and CUDA call."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and e.get("ph") == "X"]
    device = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e) for e in events
                    if e.get("cat") in DEVICE_CATS)
    out: dict[str, Any] = {"device_events": len(device)}
    if not device:
        return out
    busy, gaps, end = 0.0, [], device[0][0]
    for start, stop, _ in device:
        if start > end:
            gaps.append(start - end)
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    window = end - device[0][0]
    per_stream = _tally((f"{e.get('cat')}@stream{(e.get('args') or {}).get('stream', '?')}", stop - start)
                        for start, stop, e in device)
    host = _tally((f"{e['cat']}:{e.get('name')}", float(e.get("dur", 0))) for e in events
                  if e.get("cat") in ("user_annotation", "cuda_runtime", "cuda_driver"))
    out.update({
        "window_ms": window / 1e3, "busy_ms": busy / 1e3, "busy_fraction": busy / window if window else 0.0,
        "gaps_over_50us": sum(1 for g in gaps if g > 50), "gap_ms_over_50us": sum(g for g in gaps if g > 50) / 1e3,
        "longest_gap_ms": max(gaps, default=0.0) / 1e3,
        "streams": {k: {"events": int(n), "ms": t / 1e3} for k, (n, t) in sorted(per_stream.items())},
        "host": {k: {"calls": int(n), "ms": t / 1e3}
                 for k, (n, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:25]},
    })
    return out


def format_timeline(t: dict[str, Any]) -> str:
    if not t.get("device_events"):
        return "device timeline: no device events traced"
    lines = [f"device busy {t['busy_ms']:.1f} of {t['window_ms']:.1f} ms ({t['busy_fraction']:.3f}); "
             f"{t['gaps_over_50us']} idle gaps > 50 us, {t['gap_ms_over_50us']:.1f} ms in all, "
             f"longest {t['longest_gap_ms']:.2f} ms"]
    lines += [f"  {k:<32}{v['events']:>8} events {v['ms']:>10.1f} ms" for k, v in t["streams"].items()]
    lines.append("host (annotations and CUDA calls, by total time):")
    lines += [f"  {k[:60]:<60}{v['calls']:>8} calls {v['ms']:>10.1f} ms" for k, v in t["host"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", default="", help="YAML list (default: the built-in list)")
    ap.add_argument("--only", default="", help="comma-separated experiment names to run")
    ap.add_argument("--config", default=BASE, help="base config for experiments without their own")
    ap.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                    metavar="KEY=VALUE", help="override applied to every experiment (repeatable)")
    ap.add_argument("--backend", choices=["auto", "nsys", "torch"], default="auto")
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput run per experiment")
    ap.add_argument("--gpu-id", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="per nsys subprocess")
    ap.add_argument("--out", default="profiles")
    args = ap.parse_args(argv)

    exps = load_experiments(args.experiments)
    if args.only:
        wanted = args.only.split(",")
        exps = [e for e in exps if e["name"] in wanted]
        missing = set(wanted) - {e["name"] for e in exps}
        if missing:
            raise SystemExit(f"unknown experiments: {sorted(missing)}")
    backend = args.backend if args.backend != "auto" else ("nsys" if nsys_works() else "torch")
    common = dict(args.overrides)
    out_dir = Path(args.out)
    rows = []
    for exp in exps:
        name = exp["name"]
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        cfg = resolve(exp, args.config, common)
        cfg_path = folder / "config.yaml"
        cfg_path.write_text(dump_yaml(cfg))
        try:
            res = run_nsys(name, cfg_path, folder, args) if backend == "nsys" else run_torch_profiler(cfg, folder, args)
        except Exception as exc:  # one failing experiment must not lose the others' reports
            res = {"backend": backend, "rc": -1, "error": f"{type(exc).__name__}: {exc}"}
        res["name"] = name
        rows.append(res)
        print(f"{name}: {res.get('frames_per_s', float('nan')):.1f} frames/s "
              f"[{res['backend']}] {res.get('summary', res.get('error', ''))}", flush=True)

    header = f"{'experiment':<24}{'backend':<16}{'frames/s':>10}{'panels/s':>11}{'GB/s':>8}{'p50 ms':>9}  report"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name']:<24}{r['backend']:<16}{r.get('frames_per_s', float('nan')):>10.1f}"
                     f"{r.get('panels_per_s', float('nan')):>11.1f}{r.get('gb_per_s', float('nan')):>8.3f}"
                     f"{r.get('latency_ms_p50', float('nan')):>9.2f}  {r.get('summary', r.get('error', ''))}")
    table = "\n".join(lines)
    (out_dir / "summary.txt").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    print(table)
    return 0 if all(r.get("rc") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
