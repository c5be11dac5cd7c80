#!/usr/bin/env python3
"""Regenerate the bundled sample run (producers/data/): simulated epix10k2M frames, uint16,
written in the `record` format (gzip) with a JSON-lines truth file. Deterministic (fixed seed
and timestamps), so the same code gives the same bytes. Parameters: peaknet_producers.sample.

    .venv/bin/python tools/make_sample_run.py [--frames 20] [--out producers/data]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from peaknet_daemon.wire import decode_header, encode_frame
from peaknet_producers import sample
from peaknet_producers.record import RecordWriter
from peaknet_producers.truth import TruthWriter


def main() -> None:
    ap = argparse.ArgumentParser(description="Regenerate the bundled sample run.")
    ap.add_argument("--frames", type=int, default=sample.FRAMES)
    ap.add_argument("--out", default=str(sample.DATA_DIR))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = sample.sample_simulator()
    h5, truth = out / sample.SAMPLE_RUN.name, out / sample.SAMPLE_TRUTH.name
    writer = RecordWriter(h5, compression="gzip", level=6)
    with TruthWriter(truth, sample.SOURCE, sample.RUN) as tw:
        for seq in range(args.frames):
            frame = sim.simulate(seq)
            parts = encode_frame(frame.data, sample.SOURCE, seq, sample.RUN,
                                 timestamp_ns=sample.T0_NS + seq * sample.PERIOD_NS, meta=frame.meta)
            writer.add_frame(decode_header(parts[0]), parts[0], frame.data)
            tw.write(seq, frame.peaks)
    writer.close()
    for p in (h5, truth):
        print(f"{p}  {p.stat().st_size / 1e6:.2f} MB  sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
