"""The bundled sample run: where it lives and how it was made (tools/make_sample_run.py
regenerates it from these constants; tests rebuild its frames to check replay bit for bit)."""

from __future__ import annotations

from pathlib import Path

from .bragg import BraggConfig, BraggSimulator

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_RUN = DATA_DIR / "sample_run.h5"
SAMPLE_TRUTH = DATA_DIR / "sample_run_truth.jsonl"
SOURCE, RUN, SEED, FRAMES, DETECTOR = "sample", 1, 2024, 20, "epix10k2m"
T0_NS = 1_764_000_000_000_000_000  # fixed start time; frames 1/120 s apart, like LCLS
PERIOD_NS = 1_000_000_000 // 120
# A quiet background (0.1 photons/pixel, realistic away from the water ring) keeps the file at a
# few MB: Poisson noise does not compress. SNR is relative to that noise, so the range is raised
# to keep the weakest peaks at a few photons.
CONFIG = dict(background_photons=0.1, snr_range=(6.0, 60.0), dtype="uint16")


def sample_simulator() -> BraggSimulator:
    """The simulator the sample run was drawn from."""
    return BraggSimulator(BraggConfig.for_detector(DETECTOR, **CONFIG), seed=SEED)
