"""`peaknet-producer`: random, bragg, replay and record subcommands.

Bad input ends with one line on stderr naming the thing and exit status 1 (2 for bad usage,
130 after a second Ctrl-C). The first SIGINT or SIGTERM stops sending; `end` still goes out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Sequence

from .errors import ProducerError
from .formats import COMPRESSIONS, ENCODERS, make_encoder

PROG = "peaknet-producer"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 2,64,64, got {text!r}") from None


def _floats(text: str) -> tuple[float, float]:
    try:
        vals = tuple(float(t) for t in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"expected a range lo,hi, got {text!r}")
    return vals  # type: ignore[return-value]


def _run_id(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _common(p: argparse.ArgumentParser, frames_default: int | None) -> None:
    g = p.add_argument_group("stream")
    g.add_argument("--endpoint", default="tcp://127.0.0.1:5555",
                   help="ZMQ endpoint; with --sources and --bind, '{i}' is the source index")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--bind", action="store_true", help="bind the PUSH socket")
    mode.add_argument("--connect", action="store_true", help="connect the PUSH socket (default)")
    g.add_argument("--frames", type=int, default=frames_default,
                   help=f"frames to send, 0 = unlimited (default {frames_default or 'all'})")
    g.add_argument("--rate", type=float, default=0.0, help="frames/s, 0 = as fast as possible")
    g.add_argument("--source", default=None, help="source id (default p0)")
    g.add_argument("--run", type=_run_id, default=None, help="run number or name (default 0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--hwm", type=int, default=32, help="send high-water mark, messages")
    g.add_argument("--linger", type=int, default=60_000,
                   help="ms to wait at exit for queued frames to be delivered (-1 = for ever)")
    g.add_argument("--timeout", type=float, default=10.0,
                   help="s to wait for a consumer to take a message before giving up")
    g.add_argument("--sources", type=int, default=1, help="run K sources, one process each")
    g.add_argument("--format", default="peaknet/1", choices=sorted(ENCODERS),
                   help="wire format: the daemon's peaknet/1, or as a detector sends it")
    g.add_argument("--io-threads", type=int, default=1,
                   help="ZMQ I/O threads: one moves ~5 GB/s; a bound producer with several connected "
                        "ingest processes spreads them over its threads, as a detector's sender does")
    g.add_argument("--compression", default=None,
                   choices=sorted({c for cs in COMPRESSIONS.values() for c in cs}),
                   help="how the format compresses frames (stream2, eiger-v1: bslz4 (default), lz4 or none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a TTY")
    g.add_argument("--curve-client-key", default="", metavar="FILE",
                   help="CURVE: this producer's key pair (.key_secret from peaknet-keygen)")
    g.add_argument("--curve-server-key", default="", metavar="FILE",
                   help="CURVE: the daemon's public key (.key)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Send peaknet/1 frames over ZeroMQ, or record them.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("random", help="plain random tensors")
    _common(p, 100)
    p.add_argument("--shape", type=_ints, default=(16, 352, 384), help="P,H,W or H,W")
    p.add_argument("--dtype", default="float32", choices=("uint16", "int16", "int32", "float16", "float32"))
    p.add_argument("--pool", type=int, default=8, help="distinct frames drawn and cycled")

    p = sub.add_parser("bragg", help="simulated Bragg frames with ground truth")
    _common(p, 100)
    from .bragg import DETECTORS

    p.add_argument("--detector", default="epix10k2m", choices=sorted(DETECTORS))
    p.add_argument("--shape", type=_ints, default=None, help="explicit P,H,W instead of --detector")
    p.add_argument("--dtype", default="uint16", choices=("uint16", "float32"))
    p.add_argument("--peaks", type=_ints, default=(10, 60), help="peaks per hit, lo,hi")
    p.add_argument("--hit-fraction", type=float, default=0.7)
    p.add_argument("--snr", type=_floats, default=(3.0, 30.0), help="lo,hi")
    p.add_argument("--sigma", type=_floats, default=(0.6, 1.4), help="peak width in px, lo,hi")
    p.add_argument("--background", type=float, default=2.0, help="mean background photons/pixel")
    p.add_argument("--no-water-ring", action="store_true")
    p.add_argument("--hot-pixels", type=int, default=20)
    p.add_argument("--dead-pixels", type=int, default=20)
    p.add_argument("--adu-per-photon", type=float, default=1.0)
    p.add_argument("--photon-energy", type=float, default=9500.0, help="eV")
    p.add_argument("--distance", type=float, default=100.0, help="detector distance, mm")
    p.add_argument("--pool", type=int, default=0, help="simulate K frames and cycle them (0 = all unique)")
    p.add_argument("--truth", default=None, help="ground truth file: .h5 or JSON lines")
    p.add_argument("--truth-in-meta", action="store_true", help="also send peak columns in meta")

    p = sub.add_parser("replay", help="frames from HDF5, .npy or .npz files")
    _common(p, None)
    p.add_argument("files", nargs="+", help="files or globs")
    p.add_argument("--dataset", default=None, help="HDF5 dataset path or .npz key")
    p.add_argument("--panels", type=int, default=None, help="split a (N, P*H, W) slab into P panels")
    p.add_argument("--loop", action="store_true", help="start over after the last file")
    p.add_argument("--keep-timestamps", action="store_true", help="send the recorded timestamps")

    p = sub.add_parser("record", help="record a stream to HDF5 for replay")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--bind", action="store_true", help="bind the PULL socket")
    mode.add_argument("--connect", action="store_true", help="connect the PULL socket (default)")
    p.add_argument("--output", "-o", required=True, help="HDF5 file to write")
    p.add_argument("--frames", type=int, default=0, help="stop after N frames (0 = at end)")
    p.add_argument("--ends", type=int, default=1, help="stop after K end messages (K sources)")
    p.add_argument("--compression", default="gzip", choices=("gzip", "lzf", "none"))
    p.add_argument("--level", type=int, default=4, help="gzip level")
    p.add_argument("--hwm", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=10.0, help="s without a message before giving up")
    p.add_argument("--no-progress", action="store_true")
    return ap


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not args.no_progress


def _send(args: argparse.Namespace, items, stop: threading.Event, source: str, run: int | str,
          on_sent=None) -> int:
    from .sender import run_producer

    summary = run_producer(
        items, args.endpoint, bind=args.bind, source=source, run=run,
        frames=args.frames or None, rate=args.rate, hwm=args.hwm, linger_ms=args.linger,
        timeout_s=args.timeout, stop=stop, on_sent=on_sent, progress=_progress(args),
        curve_client_key=args.curve_client_key, curve_server_key=args.curve_server_key, format=args.format,
        io_threads=args.io_threads, compression=args.compression)
    print(summary.line(), flush=True)
    return 0


def cmd_random(args: argparse.Namespace, stop: threading.Event) -> int:
    from .synthetic import random_items

    try:
        items = random_items(args.shape, args.dtype, args.seed, args.pool)
        first = next(items)
    except ValueError as exc:
        raise ProducerError(f"--shape/--dtype: {exc}") from None
    import itertools

    return _send(args, itertools.chain([first], items), stop, args.source or "p0", args.run or 0)


def cmd_bragg(args: argparse.Namespace, stop: threading.Event) -> int:
    from .bragg import BraggConfig, BraggSimulator, bragg_items
    from .truth import TruthWriter

    if len(args.peaks) != 2:
        raise ProducerError(f"--peaks needs lo,hi, got {args.peaks}")
    kw = dict(dtype=args.dtype, peaks_per_frame=args.peaks, hit_fraction=args.hit_fraction,
              snr_range=args.snr, sigma_px=args.sigma, background_photons=args.background,
              water_ring=not args.no_water_ring, hot_pixels=args.hot_pixels,
              dead_pixels=args.dead_pixels, adu_per_photon=args.adu_per_photon,
              photon_energy_ev=args.photon_energy, detector_distance_mm=args.distance)
    try:
        cfg = BraggConfig(shape=args.shape, **kw) if args.shape else BraggConfig.for_detector(args.detector, **kw)
    except ValueError as exc:
        raise ProducerError(f"bragg configuration: {exc}") from None
    source, run = args.source or "p0", args.run if args.run is not None else 0
    items = bragg_items(BraggSimulator(cfg, args.seed), args.truth_in_meta, args.pool)
    if not args.truth:
        return _send(args, items, stop, source, run)
    try:
        writer = TruthWriter(args.truth, source, run)
    except OSError as exc:
        raise ProducerError(f"cannot write truth file {args.truth}: {exc.strerror}") from None
    with writer:
        return _send(args, items, stop, source, run, on_sent=lambda seq, item: writer.write(seq, item.truth))


def cmd_replay(args: argparse.Namespace, stop: threading.Event) -> int:
    from .replay import expand, probe, replay_items

    paths = expand(args.files)
    rec_source, rec_run = probe(paths, args.dataset, args.panels)
    source = args.source or rec_source or "p0"
    run = args.run if args.run is not None else (rec_run if rec_run is not None else 0)
    items = replay_items(paths, args.dataset, args.panels, args.loop, args.keep_timestamps)
    return _send(args, items, stop, source, run)


def cmd_record(args: argparse.Namespace, stop: threading.Event) -> int:
    from .record import record_stream

    summary = record_stream(args.endpoint, args.output, bind=args.bind, frames=args.frames or None,
                            ends=args.ends, hwm=args.hwm, timeout_s=args.timeout,
                            compression=args.compression, level=args.level, stop=stop,
                            progress=_progress(args))
    print(summary.line(), flush=True)
    return 0


COMMANDS = {"random": cmd_random, "bragg": cmd_bragg, "replay": cmd_replay, "record": cmd_record}


def _install_signals(stop: threading.Event) -> dict:
    """First SIGINT/SIGTERM: stop gracefully (end still goes out); a second SIGINT aborts.
    Returns the previous handlers."""

    def handler(signum, frame):  # noqa: ARG001
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _check(args: argparse.Namespace) -> None:
    """Ranges argparse does not check."""
    for name, lo in (("rate", 0), ("frames", 0), ("sources", 1), ("hwm", 0), ("timeout", 0), ("ends", 1)):
        value = getattr(args, name, None)
        if value is not None and value < lo:
            raise ProducerError(f"--{name} must be >= {lo}, got {value}")
    if hasattr(args, "format") and args.compression is not None:  # `record` has a --compression of its own
        try:
            make_encoder(args.format, args.compression)
        except ValueError as exc:
            raise ProducerError(f"--compression: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    previous = _install_signals(stop) if threading.current_thread() is threading.main_thread() else {}
    try:
        _check(args)
        if getattr(args, "sources", 1) > 1:
            from .fanout import run_sources

            return run_sources(args, argv, stop)
        return COMMANDS[args.cmd](args, stop)
    except ProducerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the user; PEAKNET_DEBUG=1 shows it
        if os.environ.get("PEAKNET_DEBUG"):
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())
