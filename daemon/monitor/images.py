"""Pictures for the page without an imaging library: panels tiled in a grid, intensities mapped
to 8 bits, and a PNG writer (zlib + struct, as the PNG specification lays the file out)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

# A dark-to-bright colour ramp for the virtual powder (anchors interpolated linearly).
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], np.float32)


def grid(panels: int) -> tuple[int, int]:
    """(rows, cols) of the near-square grid the panels are shown in (16 panels: 4 x 4)."""
    cols = int(np.ceil(np.sqrt(panels)))
    return -(-panels // cols), cols


def tile(stack: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """(P, h, w) -> one (rows*h, cols*w) image, panel p at row p // cols, column p % cols."""
    p, h, w = stack.shape
    rows, cols = grid(p)
    out = np.full((rows * h, cols * w), fill, dtype=stack.dtype)
    for i in range(p):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = stack[i]
    return out


def tile_positions(panel: np.ndarray, y: np.ndarray, x: np.ndarray, panels: int, h: int, w: int,
                   factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Peak positions (panel, y, x) in detector pixels -> (row, col) in the tiled image of
    panels shrunk by `factor` to (h, w) each (pixel-centre convention on both sides)."""
    _, cols = grid(panels)
    r, c = np.divmod(np.asarray(panel, np.int64), cols)
    scale = 1.0 / factor
    row = r * h + (np.asarray(y, np.float64) + 0.5) * scale - 0.5
    col = c * w + (np.asarray(x, np.float64) + 0.5) * scale - 0.5
    return row, col


def to_gray(image: np.ndarray, saturate: float = 99.95) -> np.ndarray:
    """A detector image -> uint8: log of the signal above the median, white from the
    `saturate` percentile up (a few hot pixels would otherwise set the scale)."""
    image = np.nan_to_num(np.asarray(image, np.float32))
    if not image.size:
        return np.zeros(image.shape, np.uint8)
    signal = np.log1p(np.maximum(image - np.median(image), 0.0))
    top = float(np.percentile(signal, saturate)) or float(signal.max())
    if top <= 0:
        return np.zeros(image.shape, np.uint8)
    return (np.minimum(signal / top, 1.0) * 255.0).astype(np.uint8)


def to_heat(counts: np.ndarray) -> np.ndarray:
    """Counts -> (H, W, 3) uint8 on the colour ramp, log-scaled; zero stays black."""
    v = np.log1p(np.maximum(np.asarray(counts, np.float64), 0.0))
    top = float(v.max()) if v.size else 0.0
    t = v / top if top > 0 else v
    pos = t * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(np.int64), len(_RAMP) - 2)
    frac = (pos - i)[..., None]
    rgb = _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac
    rgb[counts <= 0] = 0
    return rgb.astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = 6) -> bytes:
    """(H, W) gray or (H, W, 3) RGB uint8 -> PNG bytes (8-bit, no interlace, filter 0 per row)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        colour_type, channels = 0, 1
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"need (H, W) or (H, W, 3) pixels, got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("an image needs at least one pixel")
    rows = np.zeros((h, 1 + w * channels), np.uint8)  # each row: filter byte 0, then the row
    rows[:, 1:] = pixels.reshape(h, w * channels)
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _chunk(b"IEND", b""))
