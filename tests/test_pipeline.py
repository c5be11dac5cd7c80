"""The buffered pipeline against the plain sequential loop, on the CPU (same code path as CUDA)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from peaknet_daemon.config import config_from_dict
from peaknet_daemon.model import build_finder
from peaknet_daemon.pipeline import Pipeline, non_finite_frames, run_sequential
from peaknet_daemon.pipeline_throughput import synthetic_frames

SHAPE = (2, 64, 64)


def make_cfg(preset: str, buffers: int = 2, batch: int = 3, dtype: str = "float32", **pipeline):
    return config_from_dict({
        "model": {"preset": preset},
        "pipeline": {"frame_shape": list(SHAPE), "batch_size": batch, "buffers": buffers, "dtype": dtype,
                     "device": "cpu", "compile": False, "precision": "fp32", "channels_last": False,
                     "max_peaks": 64, **pipeline},
    })


def frames_for(preset: str, n: int, seed: int = 1) -> np.ndarray:
    return synthetic_frames(n, SHAPE, seed=seed)


@pytest.fixture(scope="module")
def finders():
    """One finder per preset, shared so pipeline and reference use the same random weights."""
    torch.manual_seed(0)
    return {p: build_finder(make_cfg(p).model, make_cfg(p).pipeline, torch.device("cpu"))
            for p in ("classical", "peaknet-atto")}


def run_pipeline(pipe: Pipeline, frames: np.ndarray, sizes: list[int] | None = None):
    """Feed `frames` in batches (sizes default to full batches, last one partial); collect all."""
    if sizes is None:
        sizes = [min(pipe.batch_size, len(frames) - i) for i in range(0, len(frames), pipe.batch_size)]
    results, i = [], 0
    for n in sizes:
        slot = pipe.acquire(timeout=5.0)
        assert slot is not None
        slot.frames[:n] = frames[i:i + n]
        pipe.submit(slot, n, [("tag", i + k) for k in range(n)])
        results.extend(pipe.collect(block=False))
        i += n
    results.extend(pipe.drain())
    return results


def assert_same_peaks(got, ref):
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.n_peaks == b.n_peaks and a.overflow == b.overflow, f"frame {k}"
        assert a.panel.dtype == b.panel.dtype == np.int16
        np.testing.assert_array_equal(a.as_array(), b.as_array(), err_msg=f"frame {k}")


@pytest.mark.parametrize("buffers", [2, 3])
@pytest.mark.parametrize("preset", ["classical", "peaknet-atto"])
def test_pipeline_matches_sequential(preset, buffers, finders):
    cfg = make_cfg(preset, buffers=buffers)
    frames = frames_for(preset, 7)
    ref = run_sequential(cfg, list(frames), finder=finders[preset])
    with Pipeline(cfg, finder=finders[preset]) as pipe:
        assert pipe.device.type == "cpu" and pipe.pinned_bytes == 0
        results = run_pipeline(pipe, frames)
    assert [len(r.frames) for r in results] == [3, 3, 1]
    assert [t for r in results for t in r.tags] == [("tag", i) for i in range(7)]
    assert all(r.padded_peaks == 0 and r.done_at >= r.submitted_at for r in results)
    assert_same_peaks([f for r in results for f in r.frames], ref)
    assert sum(f.n_peaks for f in ref) > 7  # the comparison is not vacuous


def test_padding_never_produces_peaks(finders):
    cfg = make_cfg("classical", buffers=2)
    frames = frames_for("classical", 3, seed=5)
    with Pipeline(cfg, finder=finders["classical"]) as pipe:
        slot = pipe.acquire()
        slot.frames[:] = frames  # every entry, padding included, holds peaky frames
        pipe.submit(slot, 3, [0, 1, 2])
        (full,) = pipe.drain()
        assert all(f.n_peaks > 0 for f in full.frames)  # so padding would give peaks if counted
        slot = pipe.acquire()
        slot.frames[:] = frames  # the same frames; only the first counts now
        pipe.submit(slot, 1, ["only"])
        (part,) = pipe.drain()
    assert part.tags == ["only"] and len(part.frames) == 1
    assert part.padded_peaks == 0
    np.testing.assert_array_equal(part.frames[0].as_array(), full.frames[0].as_array())


def test_raw_dtype_converted_on_device(finders):
    """uint16 slots (half the bytes moved) give the same peaks as float32 frames of equal values."""
    frames = np.rint(frames_for("classical", 5, seed=3)).astype(np.uint16)
    ref = run_sequential(make_cfg("classical"), list(frames.astype(np.float32)), finder=finders["classical"])
    with Pipeline(make_cfg("classical", dtype="uint16"), finder=finders["classical"]) as pipe:
        assert pipe.slots[0].frames.dtype == np.uint16
        results = run_pipeline(pipe, frames)
    assert_same_peaks([f for r in results for f in r.frames], ref)


def test_acquire_blocks_until_collected_and_times_out(finders):
    cfg = make_cfg("classical", buffers=2)
    frames = frames_for("classical", 2)
    with Pipeline(cfg, finder=finders["classical"]) as pipe:
        for i in range(2):
            slot = pipe.acquire(timeout=0)
            slot.frames[:1] = frames[i:i + 1]
            pipe.submit(slot, 1, [i])
        assert pipe.acquire(timeout=0.05) is None  # both slots in flight, nothing collected
        assert pipe.in_flight() == 2
        first = pipe.collect(block=True, timeout=1.0)
        assert [r.tags for r in first] == [[0], [1]]  # on the CPU both are already done
        slot = pipe.acquire(timeout=0)
        assert slot is not None
        pipe.release(slot)
        assert pipe.collect(block=True, timeout=0.05) == []  # nothing in flight: times out empty


def test_close_wakes_blocked_acquire(finders):
    cfg = make_cfg("classical", buffers=2)
    pipe = Pipeline(cfg, finder=finders["classical"])
    held = [pipe.acquire(), pipe.acquire()]
    assert all(s is not None for s in held)
    got = []
    t = threading.Thread(target=lambda: got.append(pipe.acquire()))
    t.start()
    pipe.close()
    t.join(timeout=5.0)
    assert not t.is_alive() and got == [None]


def test_concurrent_submit_and_collect_threads(finders):
    """Batching thread (acquire+submit) and result thread (collect) together: every frame once."""
    cfg = make_cfg("classical", buffers=2, batch=4)
    n_frames = 41
    frames = frames_for("classical", n_frames, seed=9)
    rng = np.random.default_rng(0)
    sizes = []
    while sum(sizes) < n_frames:
        sizes.append(int(min(rng.integers(1, 5), n_frames - sum(sizes))))
    ref = run_sequential(cfg, list(frames), finder=finders["classical"])
    collected: list = []
    errors: list = []
    with Pipeline(cfg, finder=finders["classical"]) as pipe:
        done = threading.Event()

        def result_loop():
            try:
                while not (done.is_set() and pipe.in_flight() == 0):
                    collected.extend(pipe.collect(timeout=0.05))
            except BaseException as exc:  # surfaced in the main thread
                errors.append(exc)

        t = threading.Thread(target=result_loop)
        t.start()
        i = 0
        for n in sizes:
            slot = pipe.acquire(timeout=10.0)
            assert slot is not None
            slot.frames[:n] = frames[i:i + n]
            pipe.submit(slot, n, list(range(i, i + n)))
            i += n
        done.set()
        t.join(timeout=30.0)
    assert not errors and not t.is_alive()
    assert [len(r.tags) for r in collected] == sizes
    tags = [t for r in collected for t in r.tags]
    assert tags == list(range(n_frames))
    assert_same_peaks([f for r in collected for f in r.frames], ref)


def tiny_config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("model: {preset: classical}\n"
                    "pipeline: {frame_shape: [2, 64, 64], batch_size: 2, buffers: 2, device: cpu, max_peaks: 32}\n")
    return path


def test_standalone_entry_point_prints_throughput(tmp_path, capsys):
    from peaknet_daemon.pipeline import main

    out = tmp_path / "tp.json"
    assert main(["--config", str(tiny_config_file(tmp_path)), "--gpu-id", "0", "--seconds", "0.3",
                 "--set", "pipeline.buffers=3", "--json", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert report["frames"] > 0 and report["frames_per_s"] > 0 and report["buffers"] == 3
    assert "frames/s" in capsys.readouterr().out


def test_model_only_rate_runs(tmp_path, finders):
    from peaknet_daemon.config import load_config
    from peaknet_daemon.pipeline_throughput import model_only_rate

    cfg = load_config(tiny_config_file(tmp_path))
    assert model_only_rate(cfg, seconds=0.1, device="cpu", finder=finders["classical"]) > 0


def profile_tool():
    """tools/profile_experiments.py as a module (tools/ is not a package)."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "profile_experiments.py"
    spec = importlib.util.spec_from_file_location("profile_experiments", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_experiments_runs_on_cpu(tmp_path):
    import json
    from pathlib import Path

    mod = profile_tool()
    exps = tmp_path / "exps.yaml"
    exps.write_text("experiments:\n  - {name: two-slots, overrides: {pipeline.buffers: 2}}\n"
                    "  - {name: three-slots, overrides: {pipeline.buffers: 3}}\n")
    out = tmp_path / "prof"
    rc = mod.main(["--experiments", str(exps), "--config", str(tiny_config_file(tmp_path)), "--backend", "torch",
                   "--seconds", "0.3", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in rows] == ["two-slots", "three-slots"]
    assert [r["buffers"] for r in rows] == [2, 3]
    for r in rows:
        assert r["frames_per_s"] > 0 and Path(r["trace"]).stat().st_size > 0
        assert "extract" in Path(r["summary"]).read_text()  # the stage labels reach the profiler
    assert "three-slots" in (out / "summary.txt").read_text()


def test_profile_timeline_reads_device_busy_and_gaps_from_a_trace():
    mod = profile_tool()

    def ev(cat, ts, dur, name="k", stream=7):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    # Device: 0-100 and 50-150 overlap (busy 150), idle 150-400, busy 400-500: 250 of 500 us.
    trace = {"traceEvents": [ev("kernel", 0, 100), ev("kernel", 50, 100, stream=9), ev("gpu_memcpy", 400, 100),
                             ev("user_annotation", 0, 30, name="extract"),
                             ev("user_annotation", 60, 30, name="extract"),
                             ev("cuda_runtime", 10, 5, name="cudaGraphLaunch")]}
    t = mod.gpu_timeline(trace)
    assert t["window_ms"] == 0.5 and t["busy_ms"] == 0.25 and t["busy_fraction"] == 0.5
    assert t["gaps_over_50us"] == 1 and t["longest_gap_ms"] == 0.25
    assert t["streams"]["kernel@stream9"] == {"events": 1, "ms": 0.1}
    assert t["host"]["user_annotation:extract"] == {"calls": 2, "ms": 0.06}
    assert "busy 0.2 of 0.5 ms (0.500)" in mod.format_timeline(t)
    assert mod.format_timeline(mod.gpu_timeline({"traceEvents": []})).startswith("device timeline: no device")


def test_the_launcher_enqueues_waiting_batches_net_passes_before_it_walks_an_extraction(finders):
    """The launcher's order (CUDA only, so its loop is driven here by hand with recording stand-ins
    for the two launch steps): batches already waiting get their net pass first, up to
    DETECT_AHEAD beyond the extraction walked next; a lone batch is extracted at once."""
    from peaknet_daemon import pipeline as pl

    with Pipeline(make_cfg("classical"), finder=finders["classical"]) as pipe:
        calls: list[tuple[str, int]] = []
        pipe._detect = lambda entry: calls.append(("detect", entry)) or (entry, None, None, None)
        pipe._extract = lambda entry, *rest: calls.append(("extract", entry))
        for k in range(5):  # five batches waiting at once, then the stop
            pipe._launch_q.put(k)
        pipe._launch_q.put(None)
        pipe._launch_loop()
        ahead = pl.DETECT_AHEAD
        assert calls[:ahead + 2] == [("detect", k) for k in range(ahead + 1)] + [("extract", 0)]
        assert [e for step, e in calls if step == "extract"] == list(range(5))
        for k in range(5):  # never more than DETECT_AHEAD + 1 net passes without their extraction
            assert calls.index(("detect", k)) < calls.index(("extract", k))
            done = sum(1 for step, e in calls[:calls.index(("detect", k))] if step == "extract")
            assert k - done <= ahead
        assert not pipe._launch_held

        calls.clear()  # one batch at a time: each is extracted before the launcher waits again
        worker = threading.Thread(target=pipe._launch_loop)
        worker.start()
        for k in range(3):
            seen = threading.Event()
            pipe._extract = lambda entry, *rest, seen=seen: (calls.append(("extract", entry)), seen.set())
            pipe._launch_q.put(k)
            assert seen.wait(5.0)
        pipe._launch_q.put(None)
        worker.join(5.0)
        assert calls == [(step, k) for k in range(3) for step in ("detect", "extract")]


@pytest.mark.parametrize("dtype, huge", [(torch.float32, 3e38), (torch.float16, 6e4)])
def test_non_finite_frames_are_found_and_zeroed_and_huge_finite_frames_are_not(dtype, huge):
    batch = torch.ones(7, 2, 8, 8, dtype=dtype)
    batch[1, 0, 3, 3] = float("nan")
    batch[2, 1, 0, 0] = float("inf")
    batch[3, 0, 7, 7] = -float("inf")
    batch[4, 0, 1, 1], batch[4, 1, 1, 1] = float("inf"), -float("inf")  # a frame whose sum is NaN
    batch[5] = huge  # finite, but its sum overflows: checked element by element, kept as it is
    batch[6, 0, 2, 2] = -huge
    before = batch.clone()
    bad = non_finite_frames(batch)
    assert bad.tolist() == [False, True, True, True, True, False, False]
    assert torch.isfinite(batch).all()
    assert torch.equal(batch[~bad], before[~bad])  # good frames untouched
    assert batch[1, 0, 3, 3] == 0 and batch[2, 1, 0, 0] == 0 and batch[4, 1, 1, 1] == 0
    assert (batch[1] == 1).sum() == 2 * 8 * 8 - 1  # only the non-finite pixel changed


def test_stage_labels_are_recorded_while_torch_profiler_runs(finders):
    cfg = make_cfg("classical")
    frames = frames_for("classical", 3)
    with Pipeline(cfg, finder=finders["classical"]) as pipe:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            results = run_pipeline(pipe, frames)
    names = {e.key for e in prof.key_averages()}
    assert {"detect", "collect"} <= names
    assert sum(len(r.frames) for r in results) == 3
