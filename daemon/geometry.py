"""The detector's CrystFEL geometry: read, checked against the (P, H, W) frames, rewritten for
each output.

A frame `(P, H, W)` reaches CrystFEL as the slab `(P*H, W)`: frame panel p covers slab rows
(ss) p*H .. p*H+H-1 and all columns (fs) 0 .. W-1. A geometry file (`detector.geometry`) says
where the pixels of each of its panels lie in that slab (`min_fs`, `max_fs`, `min_ss`,
`max_ss`) and where they sit in space (`corner_x`, `corner_y`, `fs`, `ss`, `res`); a
geometry panel may be a part of a frame panel (an ASIC) but must lie inside one.

The daemon owns the lines that say where the data and peaks are (`data`, `dimN`,
`peak_list`, `peak_list_type`, and `photon_energy` / `clen`, which point at per-event values),
so the user's file is rewritten for each output (`render`): the CXI files
(`CXI_TARGET`) and the CrystFEL live hand-off (`MSGPACK_TARGET`). Everything else is kept
as written. The parser is a small one of our own: the format is line-based (`key = value`,
`panel/key = value`, `;` comments), as CrystFEL's `crystfel_geometry(5)` describes it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

PANEL_RANGE = ("min_fs", "max_fs", "min_ss", "max_ss")
# What a panel needs to be placed in space (a top-level line before the panel sets a default).
PANEL_PLACEMENT = ("corner_x", "corner_y", "fs", "ss")
# Lines the daemon writes itself for each output; the user's are dropped (literal photon
# energy and camera length values are kept as fallbacks, see `Geometry.photon_energy_ev`).
OWNED_TOP = ("data", "peak_list", "peak_list_type", "photon_energy", "wavelength", "electron_voltage", "clen")
OWNED_PANEL = ("data",)
_DIM = re.compile(r"dim\d+$")


class GeometryError(ValueError):
    """A geometry file is unreadable, malformed or does not fit the frames; names the file and
    the line or panel."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class GeometryTarget:
    """Where one output puts what CrystFEL reads: the image data, its dimensions, the peak list
    and the per-event photon energy (eV) and detector distance (mm)."""

    name: str
    data: str
    dims: tuple[str, ...]
    peak_list: str
    peak_list_type: str | None
    photon_energy: str  # a location; the unit follows it in the file
    clen: str


# The CXI files (sinks/cxi_file.py): HDF5 paths.
CXI_TARGET = GeometryTarget("cxi", data="/entry_1/data_1/data", dims=("%", "ss", "fs"),
                            peak_list="/entry_1/result_1", peak_list_type="cxi",
                            photon_energy="/LCLS/photon_energy_eV", clen="/LCLS/detector_1/EncoderValue")
# The CrystFEL live hand-off (sinks/crystfel_live.py): keys of the msgpack map of each hit.
MSGPACK_TARGET = GeometryTarget("msgpack", data="detector_data", dims=("ss", "fs"), peak_list="peak_list",
                                peak_list_type=None, photon_energy="photon_energy_eV",
                                clen="detector_distance_mm")


@dataclass
class Panel:
    name: str
    fields: dict[str, str] = field(default_factory=dict)  # after the defaults that applied to it
    line: int = 0  # where it first appears

    def range(self) -> tuple[int, int, int, int]:
        return tuple(int(self.fields[k]) for k in PANEL_RANGE)  # type: ignore[return-value]


@dataclass
class Geometry:
    """A parsed geometry file: its lines (kept for `render`), panels in file order, and the
    literal photon energy / camera length it gives (None when it points at a location)."""

    path: str
    lines: list[str]
    panels: dict[str, Panel]
    photon_energy_ev: float | None = None
    detector_distance_mm: float | None = None

    def meta_defaults(self) -> dict[str, float]:
        """The literal photon energy and distance as `meta` keys: for frames without their own."""
        out = {}
        if self.photon_energy_ev is not None:
            out["photon_energy_ev"] = self.photon_energy_ev
        if self.detector_distance_mm is not None:
            out["detector_distance_mm"] = self.detector_distance_mm
        return out


def _split(raw: str) -> tuple[str, str] | None:
    """(key, value) of a line without its comment; None for a blank or comment line."""
    text = raw.split(";", 1)[0].strip()
    if not text:
        return None
    key, eq, value = text.partition("=")
    if not eq:
        raise ValueError("not a 'key = value' line")
    key, value = key.strip(), value.strip()
    if not key or not value:
        raise ValueError("empty key or value")
    return key, value


def _literal(value: str, units: dict[str, float], default_scale: float) -> float | None:
    """A number with an optional unit (`9.5 keV`, `0.12 m`) scaled by `units[unit]`; None when
    the value is a location (a dataset path or a key), not a number."""
    number, _, unit = value.partition(" ")
    try:
        x = float(number)
    except ValueError:
        return None
    unit = unit.strip()
    if unit and unit not in units:
        raise ValueError(f"unknown unit {unit!r} (known: {', '.join(units)})")
    x *= units[unit] if unit else default_scale
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{value!r} is not a positive number")
    return x


def parse_geometry(text: str, path: str = "<geometry>") -> Geometry:
    """Parse CrystFEL geometry text. Top-level panel fields (`res = ...`) set defaults for the
    panels that follow them, as CrystFEL reads them. Raises GeometryError naming the line."""
    defaults: dict[str, str] = {}
    panels: dict[str, Panel] = {}
    photon_energy = distance = None
    lines = text.replace("\r", "\n").split("\n")
    for n, raw in enumerate(lines, 1):
        try:
            kv = _split(raw)
            if kv is None:
                continue
            key, value = kv
            name, slash, sub = key.partition("/")
            if not slash:
                if key == "photon_energy":  # eV unless a unit follows (CrystFEL's rule)
                    photon_energy = _literal(value, {"eV": 1.0, "keV": 1e3}, 1.0)
                elif key == "clen":  # a literal without a unit is in metres
                    distance = _literal(value, {"m": 1e3, "mm": 1.0}, 1e3)
                elif key not in OWNED_TOP and not key.startswith(("rigid_group", "group_", "bandwidth")):
                    defaults[key] = value
                continue
            if not name or not sub or "/" in sub:
                raise ValueError("expected 'panel/key = value'")
            if name.startswith("bad"):
                continue  # a bad region, not a panel (CrystFEL's naming rule); kept as written
            panel = panels.get(name)
            if panel is None:
                panel = panels[name] = Panel(name, dict(defaults), n)
            panel.fields[sub] = value
        except ValueError as exc:
            raise GeometryError(path, f"line {n}: {exc}: {raw.strip()!r}") from None
    if not panels:
        raise GeometryError(path, "no panels (lines like 'p0/min_fs = 0')")
    for panel in panels.values():
        for key in PANEL_RANGE:
            value = panel.fields.get(key)
            if value is None:
                raise GeometryError(path, f"panel {panel.name} (line {panel.line}) has no {key}")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not number.is_integer() or number < 0:
                raise GeometryError(path, f"panel {panel.name}: {key} = {value!r} is not a pixel index >= 0")
        missing = [k for k in PANEL_PLACEMENT if k not in panel.fields]
        if "res" not in panel.fields and "pixel_pitch" not in panel.fields:
            missing.append("res")
        if missing:
            raise GeometryError(path, f"panel {panel.name} (line {panel.line}) does not say {', '.join(missing)}: "
                                      "a real geometry places every panel")
    return Geometry(path, lines, panels, photon_energy, distance)


def check_fits(geom: Geometry, frame_shape: Sequence[int]) -> None:
    """Every geometry panel lies inside one frame panel of the slab, no two overlap, and every
    frame panel is described; GeometryError naming the panel otherwise."""
    p, h, w = (int(n) for n in frame_shape)
    covered = [False] * p
    seen: list[tuple[str, tuple[int, int, int, int]]] = []
    for panel in geom.panels.values():
        min_fs, max_fs, min_ss, max_ss = rng = panel.range()
        where = f"panel {panel.name} (fs {min_fs}..{max_fs}, ss {min_ss}..{max_ss})"
        if min_fs > max_fs or min_ss > max_ss:
            raise GeometryError(geom.path, f"{where}: min beyond max")
        if max_fs >= w or max_ss >= p * h:
            raise GeometryError(geom.path, f"{where} lies outside the frames' slab (fs 0..{w - 1}, ss 0..{p * h - 1}; "
                                           f"pipeline.frame_shape {[p, h, w]})")
        if min_ss // h != max_ss // h:
            raise GeometryError(geom.path, f"{where} spans frame panels {min_ss // h} and {max_ss // h} "
                                           f"(each is {h} rows of the slab)")
        for other, (a0, a1, b0, b1) in seen:
            if min_fs <= a1 and a0 <= max_fs and min_ss <= b1 and b0 <= max_ss:
                raise GeometryError(geom.path, f"{where} overlaps panel {other}")
        seen.append((panel.name, rng))
        covered[min_ss // h] = True
    if not all(covered):
        first = covered.index(False)
        raise GeometryError(geom.path, f"frame panel {first} (ss {first * h}..{first * h + h - 1}) is in no "
                                       f"geometry panel: the file is not for frames {[p, h, w]}")


def load_geometry(path: str | os.PathLike, frame_shape: Sequence[int]) -> Geometry:
    """Read, parse and check a geometry file against the frame layout."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GeometryError(str(path), f"cannot read: {exc}") from None
    geom = parse_geometry(text, str(path))
    check_fits(geom, frame_shape)
    return geom


def render(geom: Geometry, target: GeometryTarget, frame_shape: Sequence[int]) -> str:
    """The geometry for one output: the daemon's location lines first (defaults for every
    panel), then the user's lines without the ones the daemon owns."""
    lines = [
        f"; Written by peaknet-daemon from {geom.path} for its {target.name} output.",
        f"; Frames (panels, H, W) = {tuple(int(n) for n in frame_shape)} as the slab (P*H, W).",
        f"photon_energy = {target.photon_energy} eV",
        f"clen = {target.clen} mm",
        f"data = {target.data}",
        *(f"dim{i} = {d}" for i, d in enumerate(target.dims)),
        f"peak_list = {target.peak_list}",
    ]
    if target.peak_list_type:
        lines.append(f"peak_list_type = {target.peak_list_type}")
    lines += ["", f"; ---- {geom.path} ----"]
    for raw in geom.lines:
        kv = _split(raw)
        if kv is not None:
            key = kv[0]
            name, slash, sub = key.partition("/")
            owned = (key in OWNED_TOP or bool(_DIM.match(key))) if not slash else (
                not name.startswith("bad") and (sub in OWNED_PANEL or bool(_DIM.match(sub))))
            if owned:
                lines.append(f"; (set above) {raw.strip()}")
                continue
        lines.append(raw.rstrip())
    return "\n".join(lines).rstrip("\n") + "\n"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary name unique to this process, so actors that
    write the same file at once never see (or leave) a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
