"""Producers over ZMQ in-process: start/end and counts, truth files, rate control, stop."""

import threading

import numpy as np
import pytest

from peaknet_producers.bragg import BraggConfig, BraggSimulator, bragg_items
from peaknet_producers.sender import run_producer
from peaknet_producers.synthetic import random_items
from peaknet_producers.truth import TruthWriter, read_truth

from _producer_util import Receiver, free_tcp


def _run(items, recv_kw=None, **kw):
    ep = kw.pop("endpoint", None) or free_tcp()
    bind_producer = kw.pop("bind", False)
    rx = Receiver(ep, bind=not bind_producer, **(recv_kw or {}))
    rx.start()
    assert rx.ready.wait(10)
    summary = run_producer(items, ep, bind=bind_producer, timeout_s=10, **kw)
    return summary, rx.finish()


@pytest.mark.parametrize("bind", [False, True])
def test_random_start_frames_end_count(bind, tmp_path):
    ep = f"ipc://{tmp_path}/s.ipc"
    summary, rx = _run(random_items((2, 16, 24), "float32", seed=1), endpoint=ep, bind=bind,
                       frames=37, source="r0", run=4)
    assert [c.type for c in rx.controls] == ["start", "end"]
    assert rx.controls[-1].count == 37 == len(rx.frames) == summary.frames
    assert [h.seq for h, _ in rx.frames] == list(range(37))
    assert all(h.source == "r0" and h.run == 4 and h.shape == (2, 16, 24) for h, _ in rx.frames)
    assert summary.bytes > 37 * 2 * 16 * 24 * 4


def test_bragg_truth_matches_what_was_sent(tmp_path):
    cfg = BraggConfig(shape=(3, 48, 64), hit_fraction=0.6, peaks_per_frame=(4, 12))
    sim = BraggSimulator(cfg, seed=11)
    for suffix in (".jsonl", ".h5"):
        path = tmp_path / f"truth{suffix}"
        with TruthWriter(path, "b0", 2) as tw:
            _, rx = _run(bragg_items(sim), frames=25, source="b0", run=2,
                         on_sent=lambda seq, item: tw.write(seq, item.truth))
        truth = read_truth(path)
        assert sorted(truth) == list(range(25)) == [h.seq for h, _ in rx.frames]
        hits = 0
        for h, data in rx.frames:
            t, ref = truth[h.seq], sim.simulate(h.seq)
            assert np.array_equal(data, ref.data)  # the frame sent is the simulated one
            assert t["n_peaks"] == h.meta["n_peaks"] == len(t["panel"]) == len(ref.peaks["panel"])
            if t["n_peaks"]:
                hits += 1
                assert 4 <= t["n_peaks"] <= 12
                assert np.allclose(t["y"], ref.peaks["y"]) and np.allclose(t["x"], ref.peaks["x"])
                assert ((t["panel"] >= 0) & (t["panel"] < 3)).all()
                assert ((t["y"] >= 0) & (t["y"] <= 47) & (t["x"] >= 0) & (t["x"] <= 63)).all()
                # the truth positions point at bright pixels of the frame actually sent
                vals = data[t["panel"], np.rint(t["y"]).astype(int), np.rint(t["x"]).astype(int)]
                assert vals.mean() > np.median(data) + 3
        assert 0 < hits < 25


@pytest.mark.parametrize("rate", [50.0, 500.0])
def test_rate_control_within_5_percent(rate):
    n = int(rate * 2.2)  # a bit over a 2 s window
    summary, rx = _run(random_items((1, 32, 32), "uint16"), frames=n, rate=rate)
    ts = np.array([h.timestamp_ns for h, _ in rx.frames]) / 1e9
    assert len(ts) == n
    window = ts - ts[0] < 2.0  # the frames sent in the first 2 s
    achieved = (window.sum() - 1) / (ts[window][-1] - ts[0])
    assert achieved == pytest.approx(rate, rel=0.05)
    assert summary.rate_hz == pytest.approx(rate, rel=0.05)  # the producer's own summary


def test_stop_still_sends_end_with_the_count():
    stop = threading.Event()
    ep = free_tcp()
    rx = Receiver(ep, on_frame=lambda n: stop.set() if n >= 10 else None)
    rx.start()
    assert rx.ready.wait(10)
    summary = run_producer(random_items((1, 8, 8), "float32"), ep, frames=None, rate=200.0, stop=stop)
    rx.finish()
    assert rx.controls[-1].type == "end"
    assert rx.controls[-1].count == len(rx.frames) == summary.frames >= 10
