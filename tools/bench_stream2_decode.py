"""Decode cost of one frame per wire format, on one core, without ZMQ or the pipeline: what one
ingest process spends per message in `FrameSource.decode` (parse, decompress, copy into the slot).

  python tools/bench_stream2_decode.py                    # epix10k2M uint16, random and Bragg frames
  python tools/bench_stream2_decode.py --shape 8,512,1024 --repeat 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from peaknet_daemon.config import SocketConfig
from peaknet_daemon.sources import ControlEvent, FrameTag, SourceSpec, make_source
from peaknet_producers.bragg import BraggConfig, BraggSimulator
from peaknet_producers.formats import make_encoder

FORMATS = (("peaknet/1", None), ("stream2", "none"), ("stream2", "lz4"), ("stream2", "bslz4"))


class _Slot:
    """A FrameOut with one slot, overwritten by every frame."""

    def __init__(self, shape: tuple[int, ...]):
        self.buffer = np.zeros(shape, np.uint16)

    def slot(self) -> np.ndarray:
        return self.buffer

    def commit(self, tag: FrameTag) -> None:
        pass

    def control(self, event: ControlEvent) -> None:
        pass


def measure(frame: np.ndarray, fmt: str, compression: str | None, repeat: int) -> tuple[int, float]:
    """(wire bytes, seconds per decode) of `frame` sent as `fmt`; the decoded frame is checked."""
    parts = [bytes(p) for p in make_encoder(fmt, compression).frame(frame, "p0", 0, 1, 0, {})]
    source = make_source(SourceSpec(SocketConfig(format=fmt), "tcp://bench:1", frame.shape, "uint16"))
    out, views = _Slot(frame.shape), [memoryview(p) for p in parts]
    source.decode(views, 0.0, out)
    assert np.array_equal(out.buffer, frame)
    t0 = time.perf_counter()
    for _ in range(repeat):
        source.decode(views, 0.0, out)
    return sum(len(p) for p in parts), (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="16,352,384", help="P,H,W of uint16 frames")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    frames = {"random": np.random.default_rng(0).integers(0, 1000, shape).astype(np.uint16),
              "bragg": BraggSimulator(BraggConfig(shape=shape), seed=0).simulate(0).data}
    print("| data | format | wire MB | ratio | decode ms | GB/s decompressed | frames/s per core |")
    print("|---|---|---|---|---|---|---|")
    for name, frame in frames.items():
        for fmt, compression in FORMATS:
            wire, seconds = measure(frame, fmt, compression, args.repeat)
            label = fmt + (f" {compression}" if compression else "")
            print(f"| {name} | {label} | {wire / 1e6:.2f} | {frame.nbytes / wire:.2f} | {seconds * 1e3:.2f} "
                  f"| {frame.nbytes / seconds / 1e9:.2f} | {1 / seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
