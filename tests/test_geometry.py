"""`detector.geometry`: a real CrystFEL geometry file, checked against the frame layout at start
and rewritten for the CXI files (and the live hand-off, see test_crystfel_live.py)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_daemon.config import ConfigError, config_from_dict
from peaknet_daemon.geometry import (CXI_TARGET, MSGPACK_TARGET, GeometryError, load_geometry, parse_geometry,
                                     render)
from peaknet_daemon.sinks.cxi import DETECTOR_GEOMETRY, CxiSink

SHAPE = (2, 16, 24)  # panels, H, W: each frame panel is two ASICs of 8 rows in the files below


def asic_geometry(shape=SHAPE, extra: str = "", panel_lines: dict[str, str] | None = None) -> str:
    """A geometry in the style of real multi-module files: top-level defaults, then one panel per
    ASIC (two per frame panel), with metrology-like corners."""
    p, h, w = shape
    lines = ["; test detector", "photon_energy = 9.5 keV", "clen = 0.125", "adu_per_photon = 1", "res = 5000",
             "data = /some/dataset", "dim0 = %", "dim1 = ss", "dim2 = fs", "mask_edge_pixels = 1", extra, ""]
    for i in range(p):
        for a in range(2):
            name = f"m{i}a{a}"
            fields = {"min_fs": "0", "max_fs": str(w - 1), "min_ss": str(i * h + a * h // 2),
                      "max_ss": str(i * h + (a + 1) * h // 2 - 1), "fs": "-0.0012x +0.999999y",
                      "ss": "-0.999999x -0.0012y", "corner_x": f"{100.5 * i - 3.25}", "corner_y": f"{-20.75 * a}",
                      "data": "/some/other/dataset"}
            fields.update((panel_lines or {}).get(name, {}))
            lines += [f"{name}/{k} = {v}" for k, v in fields.items()] + [""]
    lines += ["bad_beamstop/min_x = -5", "bad_beamstop/max_x = 5", "bad_beamstop/min_y = -5", "bad_beamstop/max_y = 5"]
    return "\n".join(lines) + "\n"


def key_values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split(";")[0]
        if "=" in line:
            key, value = line.split("=", 1)
            assert key.strip() not in out, f"{key.strip()} set twice"
            out[key.strip()] = value.strip()
    return out


def test_good_file_parses_checks_and_keeps_its_metrology(tmp_path):
    path = tmp_path / "det.geom"
    path.write_text(asic_geometry())
    geom = load_geometry(path, SHAPE)
    assert list(geom.panels) == ["m0a0", "m0a1", "m1a0", "m1a1"]
    assert geom.panels["m1a1"].range() == (0, 23, 24, 31)
    assert geom.panels["m0a0"].fields["res"] == "5000"  # a top-level default reaches the panels after it
    assert geom.meta_defaults() == {"photon_energy_ev": 9500.0, "detector_distance_mm": 125.0}

    for target in (CXI_TARGET, MSGPACK_TARGET):
        kv = key_values(render(geom, target, SHAPE))
        assert kv["data"] == target.data and kv["peak_list"] == target.peak_list
        assert kv["photon_energy"] == f"{target.photon_energy} eV" and kv["clen"] == f"{target.clen} mm"
        assert [kv[f"dim{i}"] for i in range(len(target.dims))] == list(target.dims)
        assert kv.get("peak_list_type") == target.peak_list_type
        assert "m0a0/data" not in kv  # the panels read the data where the daemon puts it
        assert kv["m1a0/corner_x"] == "97.25" and kv["m1a1/fs"] == "-0.0012x +0.999999y"
        assert kv["bad_beamstop/min_x"] == "-5" and kv["mask_edge_pixels"] == "1"
        again = parse_geometry(render(geom, target, SHAPE), "rendered")  # what we write reads back
        assert {n: p.range() for n, p in again.panels.items()} == {n: p.range() for n, p in geom.panels.items()}
    assert key_values(render(geom, CXI_TARGET, SHAPE))["peak_list_type"] == "cxi"


@pytest.mark.parametrize("change, problem", [
    ({"m1a1": {"max_ss": "32"}}, "panel m1a1 (fs 0..23, ss 24..32) lies outside the frames' slab"),
    ({"m0a1": {"max_fs": "24"}}, "panel m0a1 (fs 0..24, ss 8..15) lies outside"),
    ({"m0a1": {"max_ss": "16"}, "m1a0": {"min_ss": "17"}},
     "panel m0a1 (fs 0..23, ss 8..16) spans frame panels 0 and 1"),
    ({"m0a1": {"min_ss": "7"}}, "panel m0a1 (fs 0..23, ss 7..15) overlaps panel m0a0"),
    ({"m1a0": {"min_ss": "0", "max_ss": "7"}, "m1a1": {"min_ss": "8", "max_ss": "15", "min_fs": "0"}},
     "overlaps panel m0a0"),
    ({"m0a0": {"min_fs": "1.5"}}, "panel m0a0: min_fs = '1.5' is not a pixel index"),
    ({"m0a0": {"min_fs": "x"}}, "panel m0a0: min_fs = 'x' is not a pixel index"),
])
def test_a_panel_that_does_not_fit_the_frames_is_named(tmp_path, change, problem):
    path = tmp_path / "det.geom"
    path.write_text(asic_geometry(panel_lines=change))
    with pytest.raises(GeometryError) as err:
        load_geometry(path, SHAPE)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_a_frame_panel_without_geometry_and_missing_placement_are_errors(tmp_path):
    path = tmp_path / "det.geom"
    path.write_text(asic_geometry(shape=(2, 16, 24)))
    with pytest.raises(GeometryError, match=r"frame panel 2 \(ss 32..47\) is in no geometry panel"):
        load_geometry(path, (3, 16, 24))
    text = asic_geometry().replace("m1a0/corner_y = -0.0\n", "")
    with pytest.raises(GeometryError, match="panel m1a0 .* does not say corner_y"):
        parse_geometry(text, "x.geom")
    with pytest.raises(GeometryError, match="panel m0a0 .* does not say res"):
        parse_geometry(asic_geometry().replace("res = 5000\n", ""), "x.geom")
    with pytest.raises(GeometryError, match="panel m0a1 .* has no max_ss"):
        parse_geometry(asic_geometry().replace("m0a1/max_ss = 15\n", ""), "x.geom")


@pytest.mark.parametrize("bad_line, problem", [
    ("this line has no equals sign", "line 11: not a 'key = value' line"),
    ("m0a0/ = 3", "line 11: expected 'panel/key = value'"),
    ("m0a0/sub/key = 3", "line 11: expected 'panel/key = value'"),
    ("res =", "line 11: empty key or value"),
    ("photon_energy = 9.5 MeV", "line 11: unknown unit 'MeV'"),
    ("clen = -0.1", "line 11: '-0.1' is not a positive number"),
])
def test_bad_syntax_names_the_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "det.geom"
    path.write_text(asic_geometry(extra=bad_line))
    with pytest.raises(GeometryError) as err:
        load_geometry(path, SHAPE)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)
    with pytest.raises(GeometryError, match="no panels"):
        parse_geometry("res = 100\n; nothing else\n", "empty.geom")
    with pytest.raises(GeometryError, match="cannot read"):
        load_geometry(tmp_path / "missing.geom", SHAPE)


def test_config_checks_the_file_against_the_frame_shape(tmp_path):
    path = tmp_path / "det.geom"
    path.write_text(asic_geometry())
    cfg = config_from_dict({"pipeline": {"frame_shape": list(SHAPE)}, "detector": {"geometry": str(path)}}, "d.yaml")
    assert cfg.detector.geometry == str(path)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"pipeline": {"frame_shape": [2, 16, 20]}, "detector": {"geometry": str(path)}}, "d.yaml")
    msg = str(err.value)
    assert msg.startswith("d.yaml: config key 'detector.geometry'") and str(path) in msg
    assert "panel m0a0 (fs 0..23, ss 0..7) lies outside the frames' slab" in msg
    with pytest.raises(ConfigError, match="detector.geometry.*line 11"):
        path.write_text(asic_geometry(extra="oops"))
        config_from_dict({"pipeline": {"frame_shape": list(SHAPE)}, "detector": {"geometry": str(path)}}, "d.yaml")


def test_cxi_files_get_the_detector_geometry_and_its_fallback_meta(tmp_path):
    geom_path = tmp_path / "det.geom"
    geom_path.write_text(asic_geometry())
    out = tmp_path / "cxi"
    cfg = config_from_dict({"pipeline": {"frame_shape": list(SHAPE), "dtype": "float32", "max_peaks": 4},
                            "output": {"cxi_dir": str(out), "save_frames": "all"},
                            "detector": {"geometry": str(geom_path)}})
    errors: list = []
    sink = CxiSink(cfg, "w0", errors.append)
    result = {"source": "d", "seq": 1, "run": 3, "timestamp_ns": 1, "n_peaks": 1,
              "peaks": {"panel": [1], "y": [2.0], "x": [3.0], "intensity": [4.0], "npix": [1]},
              "meta": {"detector_distance_mm": 80.0}}  # its own distance wins; the energy is the file's
    sink.put(result, np.zeros(SHAPE, np.float32))
    files = sink.close_run(3)
    assert sink.close() and not errors
    written = out / DETECTOR_GEOMETRY
    kv = key_values(written.read_text())
    assert kv["peak_list"] == "/entry_1/result_1" and kv["peak_list_type"] == "cxi"
    assert kv["data"] == "/entry_1/data_1/data" and kv["m1a0/corner_x"] == "97.25"
    assert not (out / "peaknet-slab.geom").exists()  # no placeholder when the real geometry is known
    with h5py.File(files[0], "r") as f:
        assert f.attrs["geometry_file"] == DETECTOR_GEOMETRY
        assert f["/LCLS/photon_energy_eV"][0] == 9500.0 and f["/LCLS/detector_1/EncoderValue"][0] == 80.0
        assert f["/entry_1/result_1/peakYPosRaw"][0, 0] == 1 * SHAPE[1] + 2.0
    load_geometry(written, SHAPE)  # the file written for CrystFEL passes the same check


def test_without_a_geometry_the_slab_placeholder_stays(tmp_path):
    cfg = config_from_dict({"pipeline": {"frame_shape": list(SHAPE), "dtype": "float32"},
                            "output": {"cxi_dir": str(tmp_path), "save_frames": "all"}})
    sink = CxiSink(cfg, "w0", lambda exc: None)
    sink.put({"source": "d", "seq": 1, "run": 1, "timestamp_ns": 1, "n_peaks": 0, "peaks": {}},
             np.zeros(SHAPE, np.float32))
    (path,) = sink.close_run(1)
    sink.close()
    assert (tmp_path / "peaknet-slab.geom").exists() and not (tmp_path / DETECTOR_GEOMETRY).exists()
    with h5py.File(path, "r") as f:
        assert f.attrs["geometry_file"] == "peaknet-slab-2x16x24.geom"
        assert np.isnan(f["/LCLS/photon_energy_eV"][0])
    assert Path(tmp_path / "peaknet-slab-2x16x24.geom").read_text().count("/min_fs") == SHAPE[0]
