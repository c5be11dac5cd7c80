#!/usr/bin/env python3
"""How fast one training step of tools/train.py runs, per preset, batch and torch.compile mode,
and how fast one of its data workers makes panels.

Why: training is a budget of GPU minutes, so panels per second decide how much a run learns.
A step is the loop's own work (instance normalisation, forward under bf16 autocast, focal + Dice
loss, backward, gradient clipping, fused AdamW) on panels already on the device, as train.py
draws them from its pool; the simulator is not in it (train.py feeds it from other processes).
Every configuration runs in this one process, so their ratios compare on a noisy machine.

    python3 tools/bench_train.py --presets peaknet-atto --batches 32,128 --modes default,reduce-overhead
    python3 tools/bench_train.py --device cpu --presets peaknet-atto --batches 2 --modes eager --steps 3
    python3 tools/bench_train.py --data-draws 1,4 --data-seconds 30     # the data side: one worker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import build_model, forward_backward, optimiser_step, pick_device  # noqa: E402


def panels(n: int, h: int, w: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in panels: a Poisson background with a few bright pixels, and their masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.full((n, 1, h, w), 2.0), generator=g)
    y = (torch.rand(n, h, w, generator=g) < 0.002).to(torch.uint8)
    x[:, 0][y.bool()] += 50.0
    return x.to(device), y.to(device)


def time_steps(preset: str, batch: int, mode: str, steps: int, device: torch.device,
               h: int = 352, w: int = 384) -> dict[str, Any]:
    """Build, compile (mode 'eager' = none), run two warm-up steps, then time `steps` steps."""
    torch.manual_seed(0)
    model, _ = build_model(preset)
    model.to(device)
    gpu = device.type == "cuda"
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    step_model = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    x_all, y_all = panels(batch * 2, h, w, device)

    def step(i: int) -> torch.Tensor:  # train.py's step, on the same functions
        sel = slice((i % 2) * batch, (i % 2 + 1) * batch)
        opt.zero_grad(set_to_none=True)
        loss, _ = forward_backward(step_model, x_all[sel], y_all[sel], amp=gpu)
        optimiser_step(model, opt)
        return loss.detach()

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for i in range(3):  # compilation, and cudagraph recording for reduce-overhead
        step(i)
    sync()
    warm = time.perf_counter() - t0
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    sync()
    dt = time.perf_counter() - t1
    return {"preset": preset, "batch": batch, "mode": mode, "steps": steps, "warmup_s": round(warm, 1),
            "ms_per_step": round(1e3 * dt / steps, 2), "steps_per_s": round(steps / dt, 2),
            "panels_per_s": round(steps * batch / dt, 1), "loss": round(float(loss), 4),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if gpu else None}


def data_rate(draws: int, seconds: float, shape: tuple[int, int, int] = (4, 352, 384), seed: int = 3) -> dict[str, Any]:
    """Panels per second that one data worker of train.py makes (this process, one thread), with
    `draws` noise draws per simulated diffraction expectation."""
    from train import SimPanels

    torch.set_num_threads(1)
    it = iter(SimPanels(shape, seed, (2.0, 40.0), noise_draws=draws))
    panels, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = next(it)
        panels += x.shape[0]
    dt = time.perf_counter() - t0
    return {"noise_draws": draws, "panels": panels, "seconds": round(dt, 2), "panels_per_s": round(panels / dt, 1)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="peaknet-atto,peaknet-small")
    ap.add_argument("--batches", default="32,128", help="panels per step, comma-separated")
    ap.add_argument("--modes", default="default,reduce-overhead",
                    help="eager, default, reduce-overhead, max-autotune-no-cudagraphs (comma-separated)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, nargs=2, default=(352, 384), metavar=("H", "W"), help="panel size")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--data-draws", default="",
                    help="instead of steps: one data worker's panels/s per noise-draw count, e.g. 1,4")
    ap.add_argument("--data-seconds", type=float, default=20.0, help="seconds per --data-draws count")
    args = ap.parse_args(argv)
    if args.data_draws:
        rows = []
        print(f"{'noise draws':>12}{'panels':>8}{'s':>8}{'panels/s':>10}", flush=True)
        for draws in (int(d) for d in args.data_draws.split(",")):
            r = data_rate(draws, args.data_seconds)
            print(f"{r['noise_draws']:>12}{r['panels']:>8}{r['seconds']:>8}{r['panels_per_s']:>10}", flush=True)
            rows.append(r)
        if args.json:
            args.json.write_text(json.dumps({"data": rows}, indent=1))
        return 0
    device = pick_device(args.device)
    rows = []
    print(f"{'preset':<15}{'mode':<18}{'batch':>6}{'warm s':>8}{'ms/step':>9}{'steps/s':>9}{'panels/s':>10}{'GiB':>7}",
          flush=True)
    for preset in args.presets.split(","):
        for mode in args.modes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                try:
                    r = time_steps(preset, batch, mode, args.steps, device, *args.size)
                except Exception as exc:  # one failing mode (e.g. a compile error) must not hide the rest
                    r = {"preset": preset, "batch": batch, "mode": mode, "error": f"{exc!r:.300}"}
                    print(f"{preset:<15}{mode:<18}{batch:>6}  failed: {r['error']}", flush=True)
                else:
                    print(f"{preset:<15}{mode:<18}{batch:>6}{r['warmup_s']:>8}{r['ms_per_step']:>9}"
                          f"{r['steps_per_s']:>9}{r['panels_per_s']:>10}{r['peak_gib'] or '-':>7}", flush=True)
                rows.append(r)
                if args.json:  # after every row: a run stopped at its time limit keeps what it measured
                    args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
