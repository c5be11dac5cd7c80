"""Replay and record: bit-identical round trips, file formats, lists, globs and loops."""

import threading

import h5py
import numpy as np
import pytest

from peaknet_producers import sample
from peaknet_producers.bragg import BraggConfig, BraggSimulator, bragg_items
from peaknet_producers.errors import ProducerError
from peaknet_producers.record import record_stream
from peaknet_producers.replay import expand, probe, replay_items
from peaknet_producers.sender import run_producer
from peaknet_producers.truth import read_truth

from _producer_util import Receiver, free_tcp


def _send(items, **kw):
    ep = free_tcp()
    rx = Receiver(ep)
    rx.start()
    assert rx.ready.wait(10)
    run_producer(items, ep, **kw)
    return rx.finish()


def test_bundled_run_replays_bit_identical_to_its_source():
    paths = expand([str(sample.SAMPLE_RUN)])
    source, run = probe(paths)
    assert (source, run) == (sample.SOURCE, sample.RUN)
    rx = _send(replay_items(paths, keep_timestamps=True), source=source, run=run)
    sim = sample.sample_simulator()
    truth = read_truth(sample.SAMPLE_TRUTH)
    assert len(rx.frames) == sample.FRAMES == rx.controls[-1].count == len(truth)
    for h, data in rx.frames:
        ref = sim.simulate(h.seq)
        assert data.dtype == np.uint16 and data.shape == (16, 352, 384)
        assert data.tobytes() == ref.data.tobytes()
        assert h.meta == ref.meta and h.timestamp_ns == sample.T0_NS + h.seq * sample.PERIOD_NS
        assert np.array_equal(truth[h.seq]["x"], ref.peaks["x"])
        assert truth[h.seq]["n_peaks"] == h.meta["n_peaks"]
    assert sample.SAMPLE_RUN.stat().st_size < 6e6


def test_recorded_stream_replays_bit_identical(tmp_path):
    out = tmp_path / "rec.h5"
    ep = free_tcp()
    ready = threading.Event()
    result = {}
    rec = threading.Thread(target=lambda: result.update(s=record_stream(ep, out, bind=True, ready=ready)))
    rec.start()
    assert ready.wait(10)
    sim = BraggSimulator(BraggConfig(shape=(2, 40, 50), dtype="float32"), seed=4)
    sent = []
    run_producer(bragg_items(sim), ep, frames=12, source="live", run="r7",
                 on_sent=lambda seq, item: sent.append((seq, item)))
    rec.join(30)
    assert result["s"].frames == 12
    with h5py.File(out) as f:
        assert f["data"].shape == (12, 2, 40, 50) and f.attrs["format"] == "peaknet-record/1"
        recorded_ts = f["timestamp_ns"][()]
    paths = expand([str(out)])
    assert probe(paths) == ("live", "r7")
    rx = _send(replay_items(paths, keep_timestamps=True), source="live", run="r7")
    assert len(rx.frames) == 12
    for (h, data), (seq, item) in zip(rx.frames, sent):
        assert h.seq == seq and data.tobytes() == np.ascontiguousarray(item.data).tobytes()
        assert h.meta == item.meta and (h.source, h.run) == ("live", "r7")
        assert h.timestamp_ns == recorded_ts[seq]


def test_npy_npz_cxi_globs_and_loop(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, (3, 2, 8, 8)).astype(np.uint16)
    np.save(tmp_path / "a.npy", a)
    b = rng.standard_normal((2, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "b.npz", data=b, photon_energy_ev=np.array([9000.0, 9100.0]))
    slab = rng.integers(0, 100, (2, 16, 8)).astype(np.int32)  # CXI slab of 2 panels of 8x8
    with h5py.File(tmp_path / "c.cxi", "w") as f:
        f["/entry_1/data_1/data"] = slab
        f["/LCLS/photon_energy_eV"] = np.array([7000.0, 7100.0])
    frames = list(replay_items(expand([str(tmp_path / "a.npy")])))
    assert len(frames) == 3 and np.array_equal(frames[2].data, a[2])
    npz = list(replay_items(expand([str(tmp_path / "*.npz")])))
    assert npz[1].data.shape == (1, 8, 8) and npz[1].meta == {"photon_energy_ev": 9100.0}
    cxi = list(replay_items(expand([str(tmp_path / "c.cxi")]), panels=2))
    assert np.array_equal(cxi[1].data, slab[1].reshape(2, 8, 8))
    assert cxi[0].meta["photon_energy_ev"] == 7000.0
    rx = _send(replay_items(expand([str(tmp_path / "a.npy")]), loop=True), frames=7)
    assert [h.seq for h, _ in rx.frames] == list(range(7)) and rx.controls[-1].count == 7
    assert np.array_equal(rx.frames[4][1], a[1])  # frame 4 is file frame 1 on the second pass


@pytest.mark.parametrize("make,needle", [
    (lambda d: None, "file not found"),
    (lambda d: np.save(d / "x.npy", np.zeros((2, 4, 4), np.float64)), "unsupported dtype float64"),
    (lambda d: np.save(d / "x.npy", np.zeros(5, np.float32)), "rank 1"),
    (lambda d: np.save(d / "x.npy", np.zeros((1, 1, 2, 4, 4), np.float32)), "rank 5"),
])
def test_bad_files_name_the_problem(tmp_path, make, needle):
    make(tmp_path)
    with pytest.raises(ProducerError, match=needle):
        probe(expand([str(tmp_path / "x.npy")]))


def test_missing_dataset_and_empty_glob(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["other"] = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ProducerError, match="no dataset /entry_1/data_1/data"):
        probe(expand([str(tmp_path / "x.h5")]), dataset="/entry_1/data_1/data")
    with pytest.raises(ProducerError, match="no dataset"):
        probe(expand([str(tmp_path / "x.h5")]))
    with pytest.raises(ProducerError, match="no file matches"):
        expand([str(tmp_path / "*.npz")])
