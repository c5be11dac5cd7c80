#!/usr/bin/env python3
"""Train PeakNet on Bragg frames simulated on the fly, within a wall-clock budget.

Why it is built this way:
* The numpy simulator is slower than the GPU, so DataLoader workers (one per spare core) feed a
  pool of panels kept on the device; each step draws a random batch from the pool (with random
  flips), and new panels replace the oldest as they arrive. The step rate never waits for data.
* Data that looks like diffraction: most chunks come from `peaknet_producers.diffraction` (a
  random crystal's lattice meeting the Ewald sphere, resolution fall-off, partialities; panel
  gaps and edges, gain modes, ADU scales, hot and dead pixels, water and ice rings, jet streaks,
  uint16 and float, hits and non-hits), each with its own random config; `--bragg-fraction` of
  them from the older random-spot simulator (random background, SNR 2..40), which the CI accuracy
  test scores the shipped weights on. The held-out evaluation family (a Jungfrau-like detector
  with a diffuse background) is never drawn.
* Resumable: `--resume` continues from `<out>.ckpt.pt` (weights, optimiser, step, time trained,
  best score, log), so training can run as several short calls; `--schedule-minutes` is the
  total the learning-rate schedule spans over all of them.
* Tiny, sparse objects: the loss is a focal loss (pixels) plus a soft Dice loss (overlap).
* The input is normalised per image exactly as the daemon's finder does, (x - mean) / (std + eps).
* The bundled sample run (quiet background; its precision >= 0.97 is the release bar) is
  validated on too: a checkpoint is scored at the lowest threshold that keeps that bar, and the
  final threshold sweep picks the best-scoring threshold that keeps it.
* Everything respects `--minutes` (startup, torch.compile, validation, the final threshold sweep
  and the save), so one 10-minute GPU call is enough.

Outputs, all next to --out: the best weights (by validation `selection_score`) as safetensors at
--out, the JSON log (loss per step, validation metrics, the chosen threshold) at
`<out>.train.json` (or --log), and the resume checkpoint `<out>.ckpt.pt`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from peaknet_daemon.config import config_from_dict
from peaknet_daemon.evaluation import (AccuracyTally, PeakList, heldout_frames, ignore_from_sim, peaks_from_tensors,
                                       selection_score, truth_from_sim)
from peaknet_daemon.model import instance_normalise
from peaknet_daemon.model.checkpoint import save_checkpoint
from peaknet_daemon.model import build_net

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "daemon" / "weights" / "peaknet-atto.safetensors"
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.10, 0.91, 0.05))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def random_sim_config(rng: np.random.Generator, shape: tuple[int, int, int], snr: tuple[float, float]) -> Any:
    """A BraggConfig with randomised background, peaks and detector defects (one per frame)."""
    from peaknet_producers.bragg import BraggConfig

    k, h, w = shape
    area = k * h * w / (352 * 384)  # in full panels
    # Peak density log-uniform 0.5..60 per panel and 30 % empty frames: real hits are often
    # sparse, and a finder that fires on noise must pay for it in training as it does in use.
    per_panel = math.exp(rng.uniform(math.log(0.5), math.log(60.0)))
    s_lo = rng.uniform(0.5, 1.0)
    s_hi = rng.uniform(s_lo + 0.1, 1.8)
    # Background from near-empty (0.05 photons/pixel, as away from the water ring) to bright.
    background = math.exp(rng.uniform(math.log(0.05), math.log(10.0)))
    # At low backgrounds an SNR-2 peak is under one photon: undetectable, and labelling it
    # would teach the net to mark single photons. Keep the peak maximum >= 2 photons.
    snr_lo = min(max(snr[0], 2.0 / math.sqrt(background)), snr[1])
    return BraggConfig(
        shape=shape,
        dtype=str(rng.choice(["uint16", "float32"])),
        peaks_per_frame=(max(1, int(area * per_panel / 3)), max(2, int(area * per_panel))),
        hit_fraction=0.7,
        snr_range=(snr_lo, snr[1]),
        sigma_px=(float(s_lo), float(s_hi)),
        background_photons=float(background),
        water_ring=bool(rng.random() < 0.5),
        # Hot pixels (60000 ADU) dominate the per-image std; keep them near the real density
        # (the simulator's default is 20 per 16-panel frame), up to ~3 per panel.
        hot_pixels=int(rng.integers(0, int(3 * area) + 2)),
        dead_pixels=int(rng.integers(0, int(10 * area) + 2)),
        adu_per_photon=float(rng.choice([1.0, 1.0, 10.0, 35.0])),
        panel_gap_px=int(rng.choice([0, 0, 2, 4])),
    )


def simulate(cfg: Any, seed: int, seq: int = 0) -> Any:
    from peaknet_producers.bragg import BraggSimulator

    return BraggSimulator(cfg, seed=seed).simulate(seq)


class SimPanels(torch.utils.data.IterableDataset):
    """Endless (images (k,1,h,w) float32 raw, masks (k,h,w) uint8) chunks, one simulated frame each."""

    def __init__(self, shape: tuple[int, int, int], seed: int, snr: tuple[float, float],
                 frames_per_config: int = 4, bragg_fraction: float = 0.2, stream: int = 0, noise_draws: int = 1):
        super().__init__()
        self.shape, self.seed, self.snr, self.frames_per_config = shape, seed, snr, frames_per_config
        self.bragg_fraction, self.stream, self.noise_draws = bragg_fraction, stream, noise_draws

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None:  # a worker process; in-process (workers 0) the caller's threads stay
            torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, wid, self.stream])  # a resumed run draws new data
        from peaknet_producers.bragg import BraggSimulator
        from peaknet_producers.diffraction import DiffractionSimulator, random_train_config

        while True:
            # Building a simulator (background map, Poisson tables) costs more than a frame, so
            # each random config serves a few frames.
            if rng.random() < self.bragg_fraction:
                sim = BraggSimulator(random_sim_config(rng, self.shape, self.snr), int(rng.integers(2**31)))
            else:
                sim = DiffractionSimulator(random_train_config(rng, self.shape), int(rng.integers(2**31)))
            for seq in range(self.frames_per_config):
                if isinstance(sim, DiffractionSimulator):
                    frames = sim.simulate_draws(seq, self.noise_draws)
                else:
                    frames = [sim.simulate(seq)]
                for frame in frames:
                    data = torch.from_numpy(np.ascontiguousarray(frame.data, dtype=np.float32))
                    yield data.unsqueeze(1), torch.from_numpy(np.ascontiguousarray(frame.mask, dtype=np.uint8))


class Feeder:
    """Pulls chunks from DataLoader workers on a thread, so the training loop only drains a queue."""

    def __init__(self, dataset: SimPanels, workers: int, depth: int = 256):
        kw: dict[str, Any] = {"batch_size": None, "num_workers": workers}
        if workers:
            kw.update(prefetch_factor=4, persistent_workers=True,
                      multiprocessing_context="fork" if sys.platform == "linux" else None)
        self._it = iter(torch.utils.data.DataLoader(dataset, **kw))  # fork before CUDA starts
        self.queue: "queue.Queue[tuple[torch.Tensor, torch.Tensor]]" = queue.Queue(depth)
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="feeder")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = next(self._it)
                while not self._stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced by the training loop
            self.error = exc

    def stop(self) -> None:
        self._stop.set()


class Pool:
    """A FIFO ring of panels on the device; random batches are drawn from its filled part."""

    def __init__(self, size: int, h: int, w: int, device: torch.device):
        self.x = torch.zeros(size, 1, h, w, dtype=torch.float32, device=device)
        self.y = torch.zeros(size, h, w, dtype=torch.uint8, device=device)
        self.size, self.filled, self.head, self.added = size, 0, 0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for i in range(x.shape[0]):
            self.x[self.head].copy_(x[i], non_blocking=True)
            self.y[self.head].copy_(y[i], non_blocking=True)
            self.head = (self.head + 1) % self.size
            self.filled = min(self.filled + 1, self.size)
            self.added += 1

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.filled, (n,), generator=gen).to(self.x.device)
        x, y = self.x[idx], self.y[idx]
        flip = torch.rand(2, generator=gen)
        if flip[0] < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if flip[1] < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        return x, y


def drain(feeder: Feeder, pool: Pool, limit: int) -> int:
    n = 0
    while n < limit:
        try:
            x, y = feeder.queue.get_nowait()
        except queue.Empty:
            break
        pool.add(x, y)
        n += 1
    if feeder.error is not None:
        raise RuntimeError(f"data worker failed: {feeder.error!r}") from feeder.error
    return n


# ------------------------------------------------------------------------------------------------
# Model, loss
# ------------------------------------------------------------------------------------------------

def normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-image (x - mean) / (std + eps): the daemon finder's own function, so they never differ."""
    return instance_normalise(x)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.75,
             dice_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Focal loss (alpha for the peak class) + soft Dice on the peak-class probability."""
    logits = logits.float()
    t = target.long()
    ce = F.cross_entropy(logits, t, reduction="none")
    pt = torch.exp(-ce)
    a = torch.where(t == 1, alpha, 1.0 - alpha)
    focal = (a * (1 - pt) ** gamma * ce).mean() * 100.0  # scaled to the size of the Dice term
    p = logits.softmax(1)[:, 1]
    tf = t.float()
    dice = 1.0 - (2.0 * (p * tf).sum() + 1.0) / (p.sum() + tf.sum() + 1.0)
    return focal + dice_weight * dice, {"focal": focal.detach(), "dice": dice.detach()}


def forward_backward(step_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's gradients: normalise raw panels, forward (bf16 autocast when `amp`), loss,
    backward. channels_last on the GPU, as the model is there."""
    x = normalise(x)
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = step_model(x)
    loss, parts = seg_loss(logits, y)
    loss.backward()
    return loss, parts


def optimiser_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Clip the gradients' norm to 1, then step."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def build_model(preset: str) -> tuple[torch.nn.Module, Any]:
    m = config_from_dict({"model": {"preset": preset}}).model
    if m.kind != "peaknet":
        raise SystemExit(f"preset {preset!r} is not a PeakNet preset")
    net = build_net(m)
    return net, m


def lr_at(frac: float, base: float, warmup: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to 2 % over the time budget (steps are unknown ahead)."""
    if frac < warmup:
        return base * max(frac / warmup, 0.01)
    f = min(1.0, (frac - warmup) / (1 - warmup))
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * f)))


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

@dataclass
class ValSet:
    images: torch.Tensor  # (n, 1, h, w) raw, on the device
    truths: list[PeakList]  # one per panel (panel index 0)
    hits: list[Optional[bool]]
    ignores: Optional[list[Optional[PeakList]]] = None


def _panel(cols: PeakList, p: int) -> PeakList:
    sel = cols.panel == p
    return PeakList(np.zeros(int(sel.sum()), np.int64), cols.y[sel], cols.x[sel], None,
                    None if cols.snr is None else cols.snr[sel])


def make_valset(shape: tuple[int, int, int], frames: int, seed: int, device: torch.device,
                bragg_fraction: float = 0.25) -> ValSet:
    """Validation panels (seed 777, never used in training or evaluation): diffraction frames of
    the training family, and `bragg_fraction` of them from the random-spot simulator."""
    from peaknet_producers.diffraction import TRAIN_FAMILY, family_frames

    k = shape[0]
    n_bragg = int(round(frames * bragg_fraction))
    sims = heldout_frames(shape, n_bragg, seed) + family_frames(TRAIN_FAMILY, frames - n_bragg, seed, shape).frames
    images, truths, ignores = [], [], []
    for sim in sims:
        truth, _ = truth_from_sim(sim)
        ign = ignore_from_sim(sim)
        images.append(torch.from_numpy(np.asarray(sim.data, np.float32)).unsqueeze(1))
        for p in range(k):
            truths.append(_panel(truth, p))
            ignores.append(None if ign is None else _panel(ign, p))
    return ValSet(torch.cat(images).to(device), truths, [None] * len(truths), ignores)


def sample_run_valset(frames: int, device: torch.device) -> Optional[ValSet]:
    """The first `frames` frames of the bundled sample run as validation panels. Why: it is the
    release bar for precision (>= 0.97) and the only quiet background (0.1 photons/pixel) a run
    is checked on; the validation frames have none, and the 2026-12-04 fine-tune, chosen without
    it, marked clusters of a few photons there (precision 0.95)."""
    import h5py
    from peaknet_producers import sample
    from peaknet_producers.truth import read_truth

    if frames <= 0:
        return None
    with h5py.File(sample.SAMPLE_RUN, "r") as f:
        data = np.asarray(f["data"][:frames], np.float32)
    truth = read_truth(sample.SAMPLE_TRUTH)
    truths = []
    for seq in range(data.shape[0]):
        t = truth.get(seq) or {}
        cols = PeakList.from_columns(t)
        truths += [_panel(cols, p) for p in range(data.shape[1])]
    images = torch.from_numpy(data.reshape(-1, 1, *data.shape[2:]))
    return ValSet(images.to(device), truths, [None] * len(truths), None)


SAMPLE_RUN_PRECISION = 0.97  # the release bar on the bundled sample run


def keeps_sample_run(summary: dict[str, Any]) -> bool:
    """Whether a sample-run summary meets the release bar for precision."""
    return summary["overall"]["precision"] >= SAMPLE_RUN_PRECISION


def pick_operating_point(sweep: dict[tuple[float, int], dict[str, Any]],
                         sample: Optional[dict[tuple[float, int], dict[str, Any]]]) -> tuple[float, int]:
    """(threshold, min_pixels) with the best validation score, among those that keep the sample
    run's precision at the release bar when it was checked (all of them if none does)."""
    keys = list(sweep)
    if sample is not None:
        keys = [k for k in keys if keeps_sample_run(sample[k])] or keys
    return max(keys, key=lambda k: (round(val_score(sweep[k]), 3), k[1] == 1, -abs(k[0] - 0.5)))


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, batch: int, amp: bool) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], batch):
        x = normalise(images[i:i + batch])
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float().softmax(1)[:, 1])
    return torch.cat(out)


def validate(model: torch.nn.Module, val: ValSet, thresholds: tuple[float, ...], batch: int,
             amp: bool, min_pixels: int = 1, hit_threshold: int = 10) -> dict[float, dict[str, Any]]:
    """Peak-level metrics per probability threshold, counted as tools/evaluate.py counts."""
    from peaknet_daemon.peaks import extract_peaks

    was_training = model.training
    model.eval()
    probs = predict_probs(model, val.images, batch, amp)
    model.train(was_training)
    results = {}
    for thr in thresholds:
        tally = AccuracyTally(hit_threshold=hit_threshold)
        mask = probs > thr  # as PeakNetFinder does
        pt = extract_peaks(mask, val.images[:, 0], max_peaks=256, min_pixels=min_pixels, max_pixels=400)
        for i, truth in enumerate(val.truths):
            found = peaks_from_tensors(pt.peaks[i:i + 1], pt.counts[i:i + 1])
            tally.add(found, truth, val.hits[i], val.ignores[i] if val.ignores else None)
        results[thr] = tally.summary()
    return results


def checkpoint_score(model: torch.nn.Module, val: ValSet, sample_val: Optional[ValSet], batch: int,
                     amp: bool) -> tuple[float, dict[str, Any]]:
    """What 'best checkpoint' means: the validation score at the threshold the release rule
    would allow, the lowest that keeps the sample run's precision at the bar (the highest swept
    when none does; 0.5 without the sample run). So weights that mark noise on quiet frames pay
    for it in recall, as they would at their operating point."""
    thr = 0.5
    extra: dict[str, Any] = {}
    if sample_val is not None:
        on_sample = validate(model, sample_val, THRESHOLDS, batch, amp)
        thr = min((t for t in THRESHOLDS if keeps_sample_run(on_sample[t])), default=max(THRESHOLDS))
        extra = {"sample_precision": round(on_sample[thr]["overall"]["precision"], 4)}
    res = validate(model, val, (thr,), batch, amp)[thr]
    return val_score(res), {**brief(res), "threshold": thr, **extra}


def val_score(summary: dict[str, Any]) -> float:
    """What 'best' means: evaluation's `selection_score` (recall at SNR >= 3, precision over all
    found peaks, spurious ones in full), the same score OM's parameters are tuned on."""
    return selection_score(summary)


def brief(summary: dict[str, Any]) -> dict[str, float]:
    c = summary["cumulative"]
    rms = float(c[">=5"]["rms_px"])
    return {"f1_ge3": round(c[">=3"]["f1"], 4), "f1_ge5": round(c[">=5"]["f1"], 4),
            "f1_3_5": round(summary["bins"]["3-5"]["f1"], 4), "f1_all": round(summary["overall"]["f1"], 4),
            "precision": round(summary["overall"]["precision"], 4),
            "rms_ge5": None if math.isnan(rms) else round(rms, 4), "score": round(val_score(summary), 4)}


# ------------------------------------------------------------------------------------------------
# Main loop
# ------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="peaknet-atto", help="model preset (peaknet-atto, peaknet-small)")
    ap.add_argument("--minutes", type=float, default=6.0, help="total wall-clock budget, all included")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="best checkpoint (.safetensors; default daemon/weights/<preset>.safetensors)")
    ap.add_argument("--log", type=Path, default=None, help="JSON log (default: --out with .train.json)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="train on simulated panels of this size (default: a full 352x384 panel)")
    ap.add_argument("--panels-per-sim", type=int, default=4, help="panels simulated per frame (chunk)")
    ap.add_argument("--batch", type=int, default=None, help="panels per step (default 32 GPU, 8 CPU)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=None, help="data workers (default: cores - 1)")
    ap.add_argument("--pool", type=int, default=None, help="panels kept on the device (default 6144 GPU, 256 CPU)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode: default, reduce-overhead (CUDA graphs; tools/bench_train.py compares)")
    ap.add_argument("--val-frames", type=int, default=None, help="validation frames of --panels-per-sim panels (default 64 GPU, 4 CPU)")
    ap.add_argument("--val-every", type=float, default=60.0, help="seconds between validations")
    ap.add_argument("--sample-frames", type=int, default=None,
                    help="frames of the bundled sample run that checkpoint scores and the threshold sweep "
                         "keep at precision >= 0.97 (default 20 GPU, 0 CPU)")
    ap.add_argument("--seed", type=int, default=1, help="training data seed (evaluation uses 12345)")
    ap.add_argument("--val-seed", type=int, default=777)
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (fresh optimiser)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from <out>.ckpt.pt when it exists (weights, optimiser, step, schedule, log)")
    ap.add_argument("--schedule-minutes", type=float, default=None,
                    help="training time the LR schedule spans over all resumed runs (default: --minutes)")
    ap.add_argument("--noise-draws", type=int, default=1,
                    help="noise draws per simulated diffraction expectation (more distinct panels per second)")
    ap.add_argument("--bragg-fraction", type=float, default=0.2,
                    help="share of training chunks from the random-spot simulator (the rest: diffraction)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (tests)")
    ap.add_argument("--log-every", type=int, default=25, help="steps between log records")
    return ap.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: Optional[list[str]] = None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    deadline = t0 + args.minutes * 60.0
    dev = pick_device(args.device)
    gpu = dev.type == "cuda"
    if args.out == DEFAULT_OUT and args.preset != "peaknet-atto":  # never overwrite the shipped atto
        args.out = DEFAULT_OUT.with_name(f"{args.preset}.safetensors")
    cores = os.cpu_count() or 2
    workers = args.workers if args.workers is not None else max(1, cores - 1)
    h, w = args.crop if args.crop else (352, 384)
    shape = (args.panels_per_sim, h, w)
    batch = args.batch or (32 if gpu else 8)
    pool_size = args.pool or (6144 if gpu else 256)
    val_frames = args.val_frames or (48 if gpu else 4)
    log_path = args.log or args.out.with_suffix(".train.json")
    ckpt_path = resume_path(args.out)
    snr = (2.0, 40.0)
    state = load_resume(ckpt_path) if args.resume and ckpt_path.is_file() else None
    run_index = 0 if state is None else int(state["run_index"]) + 1

    # Workers are forked before CUDA is touched.
    feeder = Feeder(SimPanels(shape, args.seed, snr, bragg_fraction=args.bragg_fraction, stream=run_index,
                              noise_draws=args.noise_draws), workers)

    torch.manual_seed(args.seed)
    model, _ = build_model(args.preset)
    if args.init and state is None:
        from peaknet_daemon.model.checkpoint import load_checkpoint

        load_checkpoint(model, args.init)
    if state is not None:
        model.load_state_dict(state["model"])
    model.to(dev)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] {args.preset}: {n_params / 1e6:.2f} M params on {dev}; panels {h}x{w}, batch {batch}, "
          f"workers {workers}, pool {pool_size}, budget {args.minutes} min", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, fused=gpu)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    step_model: torch.nn.Module = model
    use_compile = args.compile == "on" or (args.compile == "auto" and gpu)
    if use_compile:
        step_model = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)

    val = make_valset(shape, val_frames, args.val_seed, dev)
    sample_val = sample_run_valset(args.sample_frames if args.sample_frames is not None else (20 if gpu else 0), dev)
    print(f"[train] validation: {val.images.shape[0]} panels, {sum(len(t) for t in val.truths)} peaks; "
          f"sample run: {0 if sample_val is None else sample_val.images.shape[0]} panels "
          f"({time.monotonic() - t0:.0f} s)", flush=True)

    pool = Pool(pool_size, h, w, dev)
    gen = torch.Generator().manual_seed(args.seed)
    log: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "preset": args.preset,
                           "params": n_params, "device": str(dev), "steps": [], "val": [], "runs": []}
    trained_before = 0.0  # seconds of training in earlier (resumed) runs
    schedule_s = 60.0 * (args.schedule_minutes or args.minutes)
    best_score, best_step, step = -1.0, -1, 0
    if state is not None:
        log = state["log"]
        trained_before, best_score, best_step, step = (float(state["trained_s"]), float(state["best_score"]),
                                                       int(state["best_step"]), int(state["step"]))
        schedule_s = float(state["schedule_s"]) if args.schedule_minutes is None else schedule_s
        gen.set_state(state["generator"])
        print(f"[train] resumed from {ckpt_path}: step {step}, {trained_before:.0f} s trained of {schedule_s:.0f} s, "
              f"best score {best_score:.4f} at step {best_step}", flush=True)
    log["runs"].append({"run": run_index, "start_step": step, "args": {k: str(v) for k, v in vars(args).items()}})
    # Reserve time at the end for a last validation, the threshold sweep and the save.
    reserve = (25.0 + (10.0 if sample_val is not None else 0.0)) if gpu else 15.0
    train_end = deadline - reserve
    min_fill = min(pool_size, batch * 4)
    while pool.filled < min_fill and time.monotonic() < train_end:
        if drain(feeder, pool, 64) == 0:
            time.sleep(0.05)
    train_start = time.monotonic()
    print(f"[train] pool primed with {pool.filled} panels ({train_start - t0:.0f} s)", flush=True)

    best_state = None
    next_val = train_start + args.val_every
    first_step = step
    amp = gpu

    def save_resume() -> None:
        save_resume_state(ckpt_path, model, opt, gen, log, step=step, run_index=run_index,
                          trained_s=trained_before + max(time.monotonic() - train_start, 0.0),
                          schedule_s=schedule_s, best_score=best_score, best_step=best_step)
    model.train()
    while True:
        now = time.monotonic()
        if now >= train_end or (args.max_steps is not None and step >= args.max_steps):
            break
        # The schedule runs over training time (excluding the first, compiling step of a run),
        # summed over resumed runs.
        frac = 0.0 if step == first_step else (trained_before + now - train_start) / max(schedule_s, 1e-6)
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, args.lr)
        drain(feeder, pool, 8)
        x, y = pool.batch(batch, gen)
        opt.zero_grad(set_to_none=True)
        try:
            loss, parts = forward_backward(step_model, x, y, amp)
        except Exception as exc:  # a torch.compile failure: fall back to eager, keep training
            if step_model is model:
                raise
            print(f"[train] torch.compile failed ({exc!r:.300}); continuing eager", flush=True)
            step_model = model
            continue
        optimiser_step(model, opt)
        step += 1
        if step == first_step + 1:
            train_start = time.monotonic()
            next_val = train_start + args.val_every
            print(f"[train] first step done ({train_start - t0:.0f} s; includes torch.compile when on)", flush=True)
        if step % args.log_every == 0:
            rec = {"step": step, "t": round(time.monotonic() - t0, 1), "loss": round(float(loss.detach()), 5),
                   **{k: round(float(v), 5) for k, v in parts.items()}, "lr": opt.param_groups[0]["lr"],
                   "pool": pool.filled, "panels_seen": pool.added}
            log["steps"].append(rec)
            if step % (args.log_every * 4) == 0:
                print(f"[train] {rec}", flush=True)
        if time.monotonic() >= next_val:
            score, row = checkpoint_score(model, val, sample_val, batch, amp)
            entry = {"step": step, "t": round(time.monotonic() - t0, 1), **row}
            log["val"].append(entry)
            print(f"[val] {entry}", flush=True)
            if score > best_score:
                best_score, best_step = score, step
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                save_checkpoint(model, args.out)
            next_val = time.monotonic() + args.val_every
            _write_log(log_path, log)
            save_resume()
    feeder.stop()

    # Final: validate the last weights, keep the better of last/best, sweep the threshold.
    score, row = checkpoint_score(model, val, sample_val, batch, amp)
    entry = {"step": step, "t": round(time.monotonic() - t0, 1), "final": True, **row}
    log["val"].append(entry)
    print(f"[val] {entry}", flush=True)
    last_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if score >= best_score or not args.out.is_file():
        best_score, best_step = score, step
        save_checkpoint(model, args.out)
    elif best_state is not None:
        model.load_state_dict(best_state)
    else:  # the best weights are from an earlier run: on disk at --out
        from peaknet_daemon.model.checkpoint import load_checkpoint

        load_checkpoint(model, args.out)
    # The resume checkpoint holds the last weights (training continues from there).
    best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(last_state)
    log["runs"][-1].update(end_step=step, elapsed_s=round(time.monotonic() - t0, 1))
    save_resume()
    model.load_state_dict(best_weights)
    # Threshold x min_pixels (pipeline.min_pixels) sweep on the chosen weights.
    sweep = {(thr, mp): s for mp in (1, 2) for thr, s in validate(model, val, THRESHOLDS, batch, amp, mp).items()}
    table = {key: brief(s) for key, s in sweep.items()}
    sample_sweep = None
    if sample_val is not None:
        sample_sweep = {(thr, mp): s for mp in (1, 2)
                        for thr, s in validate(model, sample_val, THRESHOLDS, batch, amp, mp).items()}
        for key, s in sample_sweep.items():
            table[key].update(sample_precision=round(s["overall"]["precision"], 4),
                              sample_recall=round(s["overall"]["recall"], 4))
    best_key = pick_operating_point(sweep, sample_sweep)
    best_thr, best_mp = best_key
    log["threshold_sweep"] = {f"threshold={k[0]},min_pixels={k[1]}": v for k, v in table.items()}
    log["best"] = {"step": best_step, "checkpoint_score": best_score, "threshold": best_thr,
                   "min_pixels": best_mp, **table[best_key], "checkpoint": str(args.out),
                   "size_mb": round(args.out.stat().st_size / 2**20, 2), "steps": step,
                   "panels_generated": pool.added, "elapsed_s": round(time.monotonic() - t0, 1)}
    _write_log(log_path, log)
    for (thr, mp), row in table.items():
        print(f"[sweep] threshold {thr:.2f} min_pixels {mp}: {row}", flush=True)
    print(f"[done] {json.dumps(log['best'])}", flush=True)
    if log["best"]["size_mb"] > 20:
        print(f"[done] WARNING: {args.out} is {log['best']['size_mb']} MB, over the 20 MB budget for shipped weights",
              flush=True)
    print(f"[done] RECOMMEND model.threshold = {best_thr}, pipeline.min_pixels = {best_mp} "
          f"(val F1 SNR>=3 {table[best_key]['f1_ge3']} vs {table[(0.5, 1)]['f1_ge3']} at 0.5 / 1)", flush=True)
    return 0


def resume_path(out: Path) -> Path:
    """The resume checkpoint next to the weights: <out without suffix>.ckpt.pt."""
    return out.with_suffix(".ckpt.pt")


def save_resume_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                      log: dict[str, Any], **fields: Any) -> None:
    """Everything a later `--resume` needs, written atomically (a killed call leaves the last one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "log": json.loads(json.dumps(log)), **fields}, tmp)
    tmp.replace(path)


def load_resume(path: Path) -> dict[str, Any]:
    """The resume checkpoint, read with weights_only=True (tensors, numbers, strings, dicts)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_log(path: Path, log: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(log, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
