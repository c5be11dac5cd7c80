"""CXI integrity: the strongest peaks survive the row cap (counted and marked), one checked
geometry file per frame layout, and no error ever leaves a `.cxi` with wrong content."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_daemon.config import config_from_dict
from peaknet_daemon.sinks import CxiWriter, SinkError
from peaknet_daemon.sinks.cxi_file import GEOMETRY_LINK, ensure_geometry, geometry_matches, write_geometry
from peaknet_daemon.sinks.cxi import CxiSink
from test_sinks import SHAPE, frame, make_result, writer


def test_row_cap_keeps_the_strongest_peaks_of_every_panel(tmp_path):
    w = writer(tmp_path, max_peaks=4)
    # 9 peaks over 3 panels; the 4 strongest are spread over panels 0, 1 and 2 (not panel order)
    peaks = [(p, 1.0 + i, 2.0 + i, float(v), 1) for i, (p, v) in
             enumerate([(0, 5), (0, 90), (0, 1), (1, 2), (1, 80), (1, 3), (2, 70), (2, 4), (2, 60)])]
    w.write(make_result(0, peaks), frame(0))
    w.close()
    assert w.peaks_truncated == 5
    with h5py.File(w.files()[0], "r") as f:
        r = f["/entry_1/result_1"]
        assert r["nPeaks"][0] == 4
        assert r["peakTotalIntensity"][0].tolist() == [90, 80, 70, 60]  # strongest, in panel order
        assert r["peakSegPosRaw"][0].tolist() == [0, 1, 2, 2]
        assert r["peakYPosRaw"][0].tolist() == [0 * 8 + 2.0, 1 * 8 + 5.0, 2 * 8 + 7.0, 2 * 8 + 9.0]


def test_run_writers_count_truncation_and_mark_the_result(tmp_path):
    cfg = config_from_dict({"pipeline": {"frame_shape": list(SHAPE), "dtype": "float32", "max_peaks": 1},
                            "output": {"cxi_dir": str(tmp_path), "save_frames": "all"}})
    sink = CxiSink(cfg, "w0", lambda exc: pytest.fail(str(exc)))
    assert sink.max_peaks == 3  # 1 per panel x 3 panels
    results = [make_result(0, [(0, 1, 1, float(i), 1) for i in range(5)]), make_result(1, [(0, 1, 1, 1, 1)])]
    for r in results:
        sink.mark(r)
        sink.put(r, frame(r["seq"]))
    sink.close()
    assert [r["truncated"] for r in results] == [2, 0]
    assert sink.peaks_truncated == 2


def test_one_geometry_file_per_layout_and_the_link_follows_the_latest(tmp_path):
    a = ensure_geometry(tmp_path, (3, 8, 12))
    b = ensure_geometry(tmp_path, (2, 16, 16))
    assert (a.name, b.name) == ("peaknet-slab-3x8x12.geom", "peaknet-slab-2x16x16.geom")
    assert geometry_matches(a, (3, 8, 12)) and geometry_matches(b, (2, 16, 16))
    assert not geometry_matches(a, (2, 16, 16))
    assert (tmp_path / GEOMETRY_LINK).resolve() == b.resolve()
    ensure_geometry(tmp_path, (3, 8, 12))
    assert (tmp_path / GEOMETRY_LINK).resolve() == a.resolve()


def test_a_stale_geometry_is_replaced_at_run_start_and_user_corners_are_kept(tmp_path):
    path = tmp_path / "peaknet-slab-3x8x12.geom"
    write_geometry(path, (2, 8, 12))  # wrong panel count under this layout's name
    ensure_geometry(tmp_path, (3, 8, 12))
    assert geometry_matches(path, (3, 8, 12))
    assert (tmp_path / "peaknet-slab-3x8x12.geom.stale").exists()
    # a user's metrology (other corners) passes the check and is not overwritten
    edited = path.read_text().replace("p0/corner_x = ", "p0/corner_x = 1")
    path.write_text(edited)
    ensure_geometry(tmp_path, (3, 8, 12))
    assert path.read_text() == edited


@pytest.mark.parametrize("change, what", [
    ({"seq": 2**63}, "seq beyond int64"),
    ({"timestamp_ns": -1}, "negative timestamp"),
    ({"meta": {"photon_energy_ev": "9.5 keV"}}, "non-numeric energy"),
    ({"meta": {"detector_distance_mm": float("nan")}}, "NaN distance"),
    ({"peaks": {"panel": [0, 1], "y": [1.0], "x": [1.0, 2.0], "intensity": [1.0, 1.0], "npix": [1, 1]}},
     "ragged peak columns"),
])
def test_bad_values_are_refused_before_buffering_and_the_file_stays_right(tmp_path, change, what):
    w = writer(tmp_path, grow_by=4)
    w.write(make_result(0, [(0, 1, 1, 1, 1)]), frame(0))
    bad = {**make_result(1, [(0, 1, 1, 1, 1)]), **change}
    with pytest.raises(ValueError):
        w.write(bad, frame(1))
    w.write(make_result(2, []), frame(2))
    w.close()
    assert [p.name for p in w.files()] == ["actor-0-r7-0000.cxi"], what
    with h5py.File(w.files()[0], "r") as f:
        assert f["/entry_1/seq"][:].tolist() == [0, 2]
        assert f["/entry_1/result_1/nPeaks"][:].tolist() == [1, 0]
        assert f["/entry_1/data_1/data"].shape[0] == 2


@pytest.mark.parametrize("error", [OverflowError("int too big"), TypeError("bug"), KeyError("x")])
def test_any_error_while_writing_leaves_a_partial_file_never_a_cxi(tmp_path, monkeypatch, error):
    w = writer(tmp_path, grow_by=2)
    w.write(make_result(0, [(0, 1, 1, 1, 1)]), frame(0))

    def broken(self):
        raise error

    monkeypatch.setattr(CxiWriter, "_flush", broken)
    with pytest.raises(SinkError):
        w.write(make_result(1, []), frame(1))  # fills the block: the flush fails
    monkeypatch.undo()
    assert list(tmp_path.glob("*.cxi")) == [] and len(list(tmp_path.glob("*.cxi.partial"))) == 1
    w.write(make_result(2, []), frame(2))
    w.close()
    assert [p.name for p in w.files()] == ["actor-0-r7-0001.cxi"]


def test_an_error_at_close_leaves_a_partial_file(tmp_path, monkeypatch):
    w = writer(tmp_path)
    w.write(make_result(0, []), frame(0))
    monkeypatch.setattr(CxiWriter, "_flush", lambda self: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(SinkError):
        w.close()
    assert list(tmp_path.glob("*.cxi")) == [] and len(list(tmp_path.glob("*.cxi.partial"))) == 1
