"""The N-way buffered batch pipeline: pinned host slots -> H2D -> finder + extraction -> D2H.

One `Pipeline` owns `buffers` slots allocated once (pinning per batch exhausts pinned memory and
costs more than the copy). On CUDA, H2D, detection (the finder's pass), extraction and D2H run
on four streams ordered by events, so while batch k computes, batch k+1 uploads and batch k-1's
compact peaks download. Extraction waits on the host for its own stream a few times per batch
(sizes and convergence checks), so the launcher enqueues the detections of the batches already
waiting (up to `DETECT_AHEAD`) before it walks the extraction of batch k: the net keeps the device
busy while the host does that. The host never waits for the whole device. On the CPU the very
same code runs synchronously, with no pinning and no streams.

Threading: `acquire` + `submit` come from one batching thread, `collect` from a result thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from .config import Config, load_config, with_overrides
from .model import build_finder
from .peaks import PeakTensors, extract_peaks
from .results import BatchResult, FramePeaks, split_frames

DETECT_AHEAD = 2  # net passes the launcher enqueues beyond the batch whose extraction it walks
_NOTHING = object()  # no batch taken off the launch queue this turn

TORCH_DTYPES = {"uint16": torch.uint16, "int16": torch.int16, "int32": torch.int32,
                "float16": torch.float16, "float32": torch.float32}


def resolve_device(spec: torch.device | str | None) -> torch.device:
    """'auto' (or None) -> cuda if available else cpu; 'cuda' -> the current CUDA device."""
    if spec is None or str(spec) == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@contextlib.contextmanager
def stage(name: str, cuda: bool) -> Iterator[None]:
    """An NVTX range on CUDA (for nsys) plus a profiler label (for torch.profiler, also on CPU)."""
    if cuda:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if cuda:
            torch.cuda.nvtx.range_pop()


def compute_batch(finder: torch.nn.Module, raw: torch.Tensor, valid: torch.Tensor, max_peaks: int) -> PeakTensors:
    """Raw (B,P,H,W) frames on the device -> PeakTensors for the B*P panel images.

    The finder always sees the full static batch; `valid` (B*P,) bool marks the real images.
    """
    return extract_batch(finder, detect_batch(finder, raw, valid, max_peaks), valid, max_peaks)


def detect_batch(finder: torch.nn.Module, raw: torch.Tensor, valid: torch.Tensor, max_peaks: int) -> tuple:
    """The finder's pass: (mask, signal) of the B*P panel images, all enqueued, no host wait.

    The conversion to float32 happens here, on the device, so the H2D moves the raw dtype.
    A finder with a `find_peaks(images, valid, max_peaks)` method returns PeakTensors itself
    (the benchmarks' no-op finder, which must not pay for extraction).
    """
    b, p, h, w = raw.shape
    images = raw.reshape(b * p, 1, h, w).to(torch.float32)
    direct = getattr(finder, "find_peaks", None)
    if direct is not None:
        return direct(images, valid, max_peaks)
    return finder(images)


def extract_batch(finder: torch.nn.Module, detected: tuple, valid: torch.Tensor, max_peaks: int) -> PeakTensors:
    """`detect_batch`'s (mask, signal) -> PeakTensors (waits on the host for the current stream)."""
    if isinstance(detected, PeakTensors):
        return detected
    mask, signal = detected
    return extract_peaks(mask, signal, max_peaks, finder.min_pixels, finder.max_pixels, valid=valid)


def non_finite_frames(batch: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the frames of a float batch holding NaN or Inf, which are then zeroed in place
    (so the finder never sees them; their results are dropped as `non_finite`).

    On CUDA an element-wise check and an unconditional `nan_to_num_` cost the device little, and a
    branch would make the host wait. On the CPU, where these passes were the ingest-only row's
    largest cost, a float32 sum per frame screens the batch (NaN and Inf propagate through it; it
    is vectorised, ~50x cheaper than `isfinite`): only a frame whose sum is not finite (NaN, Inf,
    or huge finite values that overflow it) is checked element by element and mended."""
    flat = batch.view(batch.shape[0], -1)
    if batch.is_cuda:
        bad = ~torch.isfinite(flat).all(1)
        batch.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return bad
    bad = ~torch.isfinite(flat.sum(1, dtype=torch.float32))
    for i in bad.nonzero().flatten().tolist():
        finite = bool(torch.isfinite(flat[i]).all())
        bad[i] = not finite
        if not finite:
            flat[i].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return bad


class BatchFailed(RuntimeError):
    """The device failed on a batch; `tags` are its frames (for the caller to account for)."""

    def __init__(self, tags: list, error: BaseException):
        self.tags = tags
        super().__init__(f"batch of {len(tags)} frames failed: {error!r}")


class Slot:
    """One batch worth of buffers: pinned host input, device input, host output, events."""

    def __init__(self, index: int, host_in: torch.Tensor, dev_in: torch.Tensor,
                 out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], cuda: bool):
        self.index = index
        self.host_in = host_in
        self.frames: np.ndarray = host_in.numpy()  # the ingest writes payloads straight here
        self.dev_in = dev_in
        self.out_peaks, self.out_counts, self.out_overflow, self.out_bad = out
        self.out_np = tuple(t.numpy() for t in out)
        # Only d2h_done is waited on by the host: blocking sync yields the core instead of spinning.
        self.h2d_done = torch.cuda.Event() if cuda else None
        self.detect_done = torch.cuda.Event() if cuda else None
        self.compute_done = torch.cuda.Event() if cuda else None
        self.d2h_done = torch.cuda.Event(blocking=True) if cuda else None
        self.used = False  # compute_done has been recorded at least once
        self.state = "free"  # free -> acquired -> in_flight -> free


@dataclass
class _InFlight:
    slot: Slot
    n: int
    tags: list
    submitted_at: float
    launched: threading.Event = field(default_factory=threading.Event)  # compute + D2H enqueued
    error: Optional[BaseException] = None  # raised by the launch, re-raised by collect
    keep: tuple = field(default=())  # device results referenced until their D2H is done


class Pipeline:
    """N-way buffered peak finding over pinned slots (see module docstring).

    On CUDA, `submit` enqueues the H2D on the caller's thread and hands the batch to a launcher
    thread that enqueues detection, extraction and D2H. Extraction waits on the host for its own
    stream a few times per batch; on the launcher thread those waits never hold back an upload,
    and the detections of the batches already there (up to `DETECT_AHEAD`) are enqueued first.
    On the CPU the launch runs inline in `submit`, so everything is synchronous.
    """

    def __init__(self, cfg: Config, device: torch.device | str | None = None,
                 finder: Optional[torch.nn.Module] = None, host_inputs: Optional[list[np.ndarray]] = None,
                 spawn: Optional[Callable[..., threading.Thread]] = None):
        """`host_inputs`: the slots' host input buffers, allocated (and pinned) by the caller,
        e.g. batch slots in shared memory; by default the pipeline allocates `buffers` pinned
        slots itself. `spawn(role, loop, on_failure)` starts the launcher thread (a supervised
        one in the worker); by default a plain thread."""
        pc = cfg.pipeline
        self.cfg = cfg
        self.device = resolve_device(device if device is not None else pc.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest conv algorithms once
        self.frame_shape: tuple[int, int, int] = tuple(pc.frame_shape)  # type: ignore[assignment]
        self.batch_size: int = pc.batch_size
        self.max_peaks: int = pc.max_peaks
        self.dtype = TORCH_DTYPES[pc.dtype]
        self.finder = finder if finder is not None else build_finder(cfg.model, pc, self.device)
        p, h, w = self.frame_shape
        n_img = self.batch_size * p
        self._lock = threading.Condition()
        self._collect_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # the assembler may submit from several ingest threads
        self._free: deque[Slot] = deque()
        self._inflight: deque[_InFlight] = deque()
        self._closed = False
        with self._on_device():
            # h2d, detect, extract, d2h. Extraction's many small kernels get the higher priority,
            # so they run as soon as SMs free up instead of queueing behind the next batch's net.
            self._streams = (tuple(torch.cuda.Stream(self.device, priority=-1 if i == 2 else 0) for i in range(4))
                             if self.cuda else (None, None, None, None))
            self._img_index = torch.arange(n_img, device=self.device)
            hosts = host_inputs if host_inputs is not None else [None] * pc.buffers
            self.slots: list[Slot] = [self._make_slot(i, n_img, h) for i, h in enumerate(hosts)]
            if self.cuda:
                torch.cuda.synchronize(self.device)  # buffers exist before other streams use them
        self._free.extend(self.slots)
        out_bytes = sum(sum(t.nbytes for t in (s.out_peaks, s.out_counts, s.out_overflow, s.out_bad))
                        for s in self.slots)
        in_bytes = sum(s.host_in.nbytes for s in self.slots)
        self.host_bytes = in_bytes + out_bytes
        self.pinned_bytes = (out_bytes + (in_bytes if host_inputs is None else 0)) if self.cuda else 0
        self._launch_q: "queue.SimpleQueue[Optional[_InFlight]]" = queue.SimpleQueue()
        self._launch_held: list[_InFlight] = []  # entries the launcher has taken and not launched
        self._launcher: Optional[threading.Thread] = None
        if self.cuda:
            if spawn is None:
                self._launcher = threading.Thread(target=self._launch_loop, name="pipeline-launch", daemon=True)
                self._launcher.start()
            else:
                self._launcher = spawn("launcher", self._launch_loop, self._launcher_failed)

    def _make_slot(self, i: int, n_img: int, host: Optional[np.ndarray] = None) -> Slot:
        shape = (self.batch_size, *self.frame_shape)
        pin = self.cuda  # pin_memory raises without CUDA
        if host is None:
            host_in = torch.empty(shape, dtype=self.dtype, pin_memory=pin)
            host_in.zero_()
        else:
            if tuple(host.shape) != shape:
                raise ValueError(f"host input of shape {host.shape}, expected {shape}")
            host_in = torch.from_numpy(host)
        dev_in = torch.zeros(shape, dtype=self.dtype, device=self.device) if self.cuda else host_in
        out = (torch.zeros((n_img, self.max_peaks, 4), dtype=torch.float32, pin_memory=pin),
               torch.zeros((n_img,), dtype=torch.int32, pin_memory=pin),
               torch.zeros((n_img,), dtype=torch.int32, pin_memory=pin),
               torch.zeros((self.batch_size,), dtype=torch.bool, pin_memory=pin))  # frame had NaN/Inf
        return Slot(i, host_in, dev_in, out, self.cuda)

    def _on_device(self) -> contextlib.AbstractContextManager:
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    def _on(self, stream: Optional[torch.cuda.Stream]) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ batching thread side
    def acquire(self, timeout: float | None = None) -> Optional[Slot]:
        """A free input slot; waits only until the oldest slot's batch has been collected."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._free or self._closed, timeout):
                return None
            if self._closed:
                return None
            slot = self._free.popleft()
            slot.state = "acquired"
            return slot

    def release(self, slot: Slot) -> None:
        """Give back an acquired slot without submitting it (e.g. at shutdown)."""
        with self._lock:
            if slot.state != "acquired":
                raise ValueError(f"slot {slot.index} is {slot.state}, not acquired")
            slot.state = "free"
            self._free.appendleft(slot)
            self._lock.notify_all()

    def submit(self, slot: Slot, n: int, tags: list) -> None:
        """Enqueue H2D, compute and D2H for the first `n` frames of `slot` (the rest is padding)."""
        if not 0 <= n <= self.batch_size or len(tags) != n:
            raise ValueError(f"n={n} with {len(tags)} tags for batch_size {self.batch_size}")
        with self._submit_lock:
            with self._lock:
                if slot.state != "acquired" or self._closed:
                    raise ValueError(f"slot {slot.index} is {slot.state}; closed={self._closed}")
                slot.state = "in_flight"
            entry = _InFlight(slot, n, list(tags), time.perf_counter())
            if self.cuda:
                try:
                    self._upload(slot)
                except BaseException:
                    with self._lock:
                        slot.state = "acquired"
                    self.release(slot)
                    raise
            with self._lock:
                self._inflight.append(entry)
                self._lock.notify_all()
            if self.cuda:
                self._launch_q.put(entry)
            else:
                self._launch(entry)

    def _upload(self, slot: Slot) -> None:
        h2d = self._streams[0]
        with self._on_device(), stage("h2d", True), torch.cuda.stream(h2d):
            if slot.used:  # the device input is free once its previous compute has finished
                h2d.wait_event(slot.compute_done)
            slot.dev_in.copy_(slot.host_in, non_blocking=True)
            slot.h2d_done.record(h2d)

    def _launch_loop(self) -> None:
        """Detection of each batch as it comes, up to `DETECT_AHEAD` batches ahead of the
        extraction the launcher walks; the oldest extraction at once when no further batch is
        waiting. A walk waits on the host for its own stream, and under load (kernels of the
        next net passes sharing the SMs, other threads wanting the GIL) it can take longer than
        one net pass: with passes queued ahead the device still never waits for it."""
        pending: deque[tuple] = deque()  # (entry, detected, valid, bad), detection enqueued
        held = self._launch_held
        while True:
            entry: Any = _NOTHING
            if len(pending) <= DETECT_AHEAD:
                try:
                    entry = self._launch_q.get(block=not pending)
                except queue.Empty:
                    pass
            if entry is None:  # close(): finish what was detected
                while pending:
                    self._extract(*pending.popleft())
                held.clear()
                return
            if entry is not _NOTHING:
                held.append(entry)
                detected = self._detect(entry)
                if detected is None:
                    held.remove(entry)
                else:
                    pending.append(detected)
                continue  # another batch waiting? its detection goes first
            oldest = pending.popleft()
            self._extract(*oldest)
            held.remove(oldest[0])

    def _launcher_failed(self, exc: BaseException) -> None:
        """The launcher thread died: the batches it held fail (collect raises BatchFailed)."""
        for entry in list(self._launch_held):
            if not entry.launched.is_set():
                self._launch_failed(entry, exc)
        self._launch_held.clear()

    def _launch(self, entry: _InFlight) -> None:
        """Detection, extraction and the D2H of the compact peaks, enqueued in one go."""
        detected = self._detect(entry)
        if detected is not None:
            self._extract(*detected)

    def _detect(self, entry: _InFlight) -> Optional[tuple]:
        """Enqueue the finder's pass (after the H2D event); None when the launch failed."""
        slot, comp = entry.slot, self._streams[1]
        try:
            with self._on_device(), torch.inference_mode(), stage("detect", self.cuda), self._on(comp):
                if self.cuda:
                    comp.wait_event(slot.h2d_done)
                valid = self._img_index < entry.n * self.frame_shape[0]
                bad = None
                if self.dtype.is_floating_point:  # NaN/Inf: checked here, on the device, not on ingest
                    bad = non_finite_frames(slot.dev_in)
                detected = detect_batch(self.finder, slot.dev_in, valid, self.max_peaks)
                if self.cuda:
                    slot.detect_done.record(comp)
            return entry, detected, valid, bad
        except BaseException as exc:
            self._launch_failed(entry, exc)
            return None

    def _extract(self, entry: _InFlight, detected: tuple, valid: torch.Tensor,
                 bad: Optional[torch.Tensor] = None) -> None:
        """Enqueue extraction (after the detection event) and the D2H of the compact peaks."""
        slot = entry.slot
        _, _, ext, d2h = self._streams
        try:
            with self._on_device(), torch.inference_mode():
                with stage("extract", self.cuda), self._on(ext):
                    if self.cuda:
                        ext.wait_event(slot.detect_done)
                        for t in (*detected, valid):
                            t.record_stream(ext)  # allocated on detect, read on extract
                    pt = extract_batch(self.finder, detected, valid, self.max_peaks)
                    if self.cuda:
                        slot.compute_done.record(ext)
                        slot.used = True
                with stage("d2h", self.cuda), self._on(d2h):
                    if self.cuda:
                        d2h.wait_event(slot.compute_done)
                        for t in pt:
                            t.record_stream(d2h)  # allocated on extract, read on d2h
                    slot.out_peaks.copy_(pt.peaks, non_blocking=self.cuda)
                    slot.out_counts.copy_(pt.counts, non_blocking=self.cuda)
                    slot.out_overflow.copy_(pt.overflow, non_blocking=self.cuda)
                    if bad is not None:
                        if self.cuda:
                            bad.record_stream(d2h)
                        slot.out_bad.copy_(bad, non_blocking=self.cuda)
                    if self.cuda:
                        slot.d2h_done.record(d2h)
                        entry.keep = (*pt, valid) if bad is None else (*pt, valid, bad)
            entry.launched.set()
        except BaseException as exc:
            self._launch_failed(entry, exc)

    def _launch_failed(self, entry: _InFlight, exc: BaseException) -> None:
        """Surface the error to the result thread (collect raises it) once nothing queued on the
        device can still read the slot."""
        entry.error = exc
        if self.cuda:
            torch.cuda.synchronize(self.device)
        entry.launched.set()

    # ------------------------------------------------------------------ result thread side
    def collect(self, block: bool = True, timeout: float | None = None,
                keep_inputs: Optional[Callable[[FramePeaks], bool]] = None) -> list[BatchResult]:
        """Finished batches in submission order; with block, waits for at least the oldest one.

        `keep_inputs(frame_peaks)` says which frames' input data to copy out of the slot before
        it is reused (`BatchResult.inputs`), e.g. hits to be saved. A batch whose launch failed
        frees its slot and raises its error here.
        """
        deadline = None if timeout is None else time.perf_counter() + timeout
        out: list[BatchResult] = []
        with self._collect_lock:
            while True:
                with self._lock:
                    if block and not out:
                        remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
                        self._lock.wait_for(lambda: self._inflight or self._closed, remaining)
                    if not self._inflight:
                        break
                    head = self._inflight[0]
                try:
                    if block and not out:
                        if not self._wait_done(head, deadline):
                            break
                    elif not self._is_done(head):
                        break
                    if head.error is None:
                        out.append(self._finish(head, keep_inputs))
                        continue
                except Exception as exc:  # e.g. a CUDA error in query(): the batch fails, not the caller
                    head.error = exc
                if out:
                    break  # hand back what finished; the failed batch is raised by the next call
                self._free_head(head)
                raise BatchFailed(head.tags, head.error) from head.error
        return out

    def drain(self) -> list[BatchResult]:
        """Collect everything in flight (waits for all of it)."""
        out: list[BatchResult] = []
        while True:
            with self._lock:
                if not self._inflight:
                    return out
            out.extend(self.collect(block=True))

    def _is_done(self, entry: _InFlight) -> bool:
        if not entry.launched.is_set():
            return False
        return entry.error is not None or entry.slot.d2h_done is None or entry.slot.d2h_done.query()

    def _wait_done(self, entry: _InFlight, deadline: float | None) -> bool:
        if not entry.launched.wait(None if deadline is None else max(0.0, deadline - time.perf_counter())):
            return False
        event = entry.slot.d2h_done
        if entry.error is not None or event is None:
            return True
        if deadline is None:
            event.synchronize()  # releases the GIL; a blocking-sync event yields the core
            return True
        pause = 5e-5
        while not event.query():  # a bounded wait: poll, backing off to 1 ms
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1e-3)
        return True

    def _free_head(self, head: _InFlight) -> None:
        with self._lock:
            self._inflight.popleft()
            head.keep = ()
            head.slot.state = "free"
            self._free.append(head.slot)
            self._lock.notify_all()

    def _finish(self, head: _InFlight, keep_inputs: Optional[Callable[[FramePeaks], bool]] = None) -> BatchResult:
        with stage("collect", self.cuda):
            peaks, counts, overflow, bad = head.slot.out_np
            frames, padded = split_frames(peaks, counts, overflow, head.n, self.frame_shape[0])
            nonfinite = np.flatnonzero(bad[: head.n]).tolist() if self.dtype.is_floating_point else []
            inputs = None
            if keep_inputs is not None:
                inputs = [head.slot.frames[i].copy() if keep_inputs(f) else None for i, f in enumerate(frames)]
        done_at = time.perf_counter()
        self._free_head(head)
        return BatchResult(tags=head.tags, frames=frames, submitted_at=head.submitted_at,
                           done_at=done_at, padded_peaks=padded, inputs=inputs, nonfinite=nonfinite)

    def in_flight(self) -> int:
        """Batches submitted and not yet collected."""
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        """Wake waiters, let in-flight copies finish (DMA must not outlive the buffers), free."""
        with self._submit_lock:  # a submit in progress finishes (and is queued) first
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                pending = list(self._inflight)
                self._inflight.clear()
                self._lock.notify_all()
            if self._launcher is not None:
                self._launch_q.put(None)
        if self._launcher is not None:
            self._launcher.join()
        for p in pending:
            if p.error is None and p.slot.d2h_done is not None:
                p.slot.d2h_done.synchronize()
        self._free.clear()
        self.slots = []

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_sequential(cfg: Config, frames: Iterable[np.ndarray], finder: Optional[torch.nn.Module] = None,
                   device: torch.device | str | None = None) -> list[FramePeaks]:
    """The plain reference loop: one batch at a time, synchronous, pageable memory, no streams.

    Uses the same finder call and extraction as `Pipeline`, so on the same device and the same
    finder the peaks must be identical.
    """
    pc = cfg.pipeline
    dev = resolve_device(device if device is not None else pc.device)
    finder = finder if finder is not None else build_finder(cfg.model, pc, dev)
    p, h, w = pc.frame_shape
    np_dtype = np.dtype(pc.dtype)
    index = torch.arange(pc.batch_size * p, device=dev)
    out: list[FramePeaks] = []
    with torch.inference_mode():
        for chunk in _batches(frames, pc.batch_size):
            batch = np.zeros((pc.batch_size, p, h, w), dtype=np_dtype)
            batch[:len(chunk)] = np.stack(chunk)
            raw = torch.from_numpy(batch).to(dev)
            pt = compute_batch(finder, raw, index < len(chunk) * p, pc.max_peaks)
            got, _ = split_frames(pt.peaks.cpu().numpy(), pt.counts.cpu().numpy(),
                                  pt.overflow.cpu().numpy(), len(chunk), p)
            out.extend(got)
    return out


# ---------------------------------------------------------------------------------------------
# Standalone entry point for single-GPU profiling
# ---------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, Any]:
    """'pipeline.batch_size=8' -> ('pipeline.batch_size', 8) (the value is read as YAML)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    from .pipeline_throughput import format_report, measure_pipeline

    ap = argparse.ArgumentParser(prog="python -m peaknet_daemon.pipeline",
                                 description="Run the batch pipeline on synthetic frames and print throughput.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpu-id", type=int, default=None, help="CUDA device index (default: config's device)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=0, help="warm-up batches (default: 2 x buffers)")
    ap.add_argument("--fill", action="store_true", help="copy a frame into each slot per batch (host memcpy)")
    ap.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                    metavar="KEY=VALUE", help="config override, e.g. pipeline.batch_size=8 (repeatable)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.overrides:
        cfg = with_overrides(cfg, dict(args.overrides))
    device = None
    if args.gpu_id is not None and torch.cuda.is_available():
        device = f"cuda:{args.gpu_id}"
    with Pipeline(cfg, device=device) as pipe:
        report = measure_pipeline(pipe, seconds=args.seconds, warmup_batches=args.warmup or 2 * len(pipe.slots),
                                  fill=args.fill)
    report["config"] = args.config
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
