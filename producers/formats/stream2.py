"""DECTRIS Stream V2 (README, Protocols): one CBOR map per message, as an EIGER2 or Jungfraujoch
sends it, so the daemon's `stream2` source can be fed and benchmarked without a detector.

Compression is written here (the DECTRIS compression package only decompresses): `bslz4` is
bitshuffle within blocks of 8 KiB, then LZ4 per block; `lz4` is LZ4 per block; both in the HDF5
filters' framing (8-byte big-endian total size, 4-byte big-endian block size, then per block a
4-byte big-endian compressed size and the LZ4 block), which the tests check against
`dectris.compression.decompress`.
"""

from __future__ import annotations

import datetime as _dt
import struct
import time
from typing import Any

import cbor2
import lz4.block
import numpy as np

from . import COMPRESSIONS as _FORMATS_COMPRESSIONS  # the registry (loaded first)

COMPRESSIONS = _FORMATS_COMPRESSIONS["stream2"]
CHANNEL = "threshold_1"
BLOCK_BYTES = 8192  # the bitshuffle filter's default block: 8 KiB of elements
LZ4_BLOCK_BYTES = 1 << 30  # the HDF5 LZ4 filter's default block size
# numpy dtype (little-endian, as detectors send) -> RFC 8746 typed-array tag
TYPED_ARRAY_TAGS = {"|u1": 64, "<u2": 69, "<u4": 70, "|i1": 72, "<i2": 77, "<i4": 78, "<f2": 84, "<f4": 85,
                    "<f8": 86}
CACHED_FRAMES = 8  # encoded frames kept (the random producer's default pool)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def bitshuffle(block: bytes, elem_size: int) -> bytes:
    """Bit transpose of whole blocks of elements: output row k (bit k % 8 of byte k // 8 of every
    element) packs that bit of each element, least significant first. `block` holds a multiple
    of 8 elements; several blocks of the same size may be passed as an (n, block) view."""
    a = np.frombuffer(block, np.uint8)
    n = a.size // elem_size
    bits = np.unpackbits(a.reshape(n, elem_size), axis=1, bitorder="little")  # (n, 8 * elem_size)
    return np.packbits(bits.T, axis=1, bitorder="little").tobytes()


def _bitshuffle_blocks(raw: bytes, elem_size: int, block_elems: int, n_blocks: int) -> np.ndarray:
    """`n_blocks` consecutive full blocks bitshuffled at once: (n_blocks, block bytes)."""
    a = np.frombuffer(raw, np.uint8, count=n_blocks * block_elems * elem_size)
    bits = np.unpackbits(a.reshape(n_blocks, block_elems, elem_size), axis=2, bitorder="little")
    return np.packbits(bits.transpose(0, 2, 1), axis=2, bitorder="little").reshape(n_blocks, -1)


def compress_bslz4(raw: bytes, elem_size: int) -> bytes:
    """bitshuffle + LZ4 in the HDF5 bitshuffle filter's framing. Trailing elements that do not
    fill a group of 8 are appended uncompressed, as the filter does."""
    n = len(raw) // elem_size
    block_elems = max(8, BLOCK_BYTES // elem_size // 8 * 8)
    full = n // block_elems
    out = [struct.pack(">QI", len(raw), block_elems * elem_size)]
    chunks = list(_bitshuffle_blocks(raw, elem_size, block_elems, full)) if full else []
    done = full * block_elems
    tail8 = (n - done) // 8 * 8
    if tail8:
        chunks.append(np.frombuffer(bitshuffle(raw[done * elem_size:(done + tail8) * elem_size], elem_size), np.uint8))
    for chunk in chunks:
        packed = lz4.block.compress(chunk.tobytes(), store_size=False)
        out += [struct.pack(">I", len(packed)), packed]
    out.append(raw[(done + tail8) * elem_size:])
    return b"".join(out)


def compress_lz4(raw: bytes) -> bytes:
    """LZ4 blocks in the HDF5 LZ4 filter's framing (a block that does not shrink is stored as is)."""
    out = [struct.pack(">QI", len(raw), LZ4_BLOCK_BYTES)]
    for start in range(0, len(raw), LZ4_BLOCK_BYTES):
        block = raw[start:start + LZ4_BLOCK_BYTES]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= len(block):
            packed = block
        out += [struct.pack(">I", len(packed)), packed]
    return b"".join(out)


def channel_array(image: np.ndarray, compression: str) -> cbor2.CBORTag:
    """One channel: a tag-40 array `[[rows, columns], typed array]`, its bytes compressed."""
    tag = TYPED_ARRAY_TAGS.get(image.dtype.str)
    if tag is None:
        raise ValueError(f"stream2 sends no {image.dtype} arrays (known: {', '.join(TYPED_ARRAY_TAGS)})")
    raw = np.ascontiguousarray(image).tobytes()
    if compression == "bslz4":
        content: Any = cbor2.CBORTag(56500, ["bslz4", image.dtype.itemsize, compress_bslz4(raw, image.dtype.itemsize)])
    elif compression == "lz4":
        content = cbor2.CBORTag(56500, ["lz4", 0, compress_lz4(raw)])
    else:
        content = raw
    return cbor2.CBORTag(40, [list(image.shape), cbor2.CBORTag(tag, content)])


def _series_id(run: int | str) -> int:
    if isinstance(run, int) and run >= 0:
        return run
    if isinstance(run, str) and run.isdigit():
        return int(run)
    raise ValueError(f"stream2 numbers its series: the run must be an integer >= 0, got {run!r}")


class Stream2Encoder:
    """start / image / end maps. A frame (P, H, W) goes as one (P*H, W) image of channel
    `threshold_1`; its meta travels in `user_data`. Timestamps are exact: `series_date` is the
    epoch and `start_time` the frame's ns. The spec's `end` has no count; this one carries
    `number_of_images` (the frames sent), which the daemon prefers to the start's.

    The encoded channels of the last 8 frame objects are kept by identity, so a pool of frames
    sent again and again (random, bragg --pool) is compressed once per frame, not per send; the
    producers never change a frame's array after yielding it."""

    def __init__(self, compression: str = "bslz4"):
        if compression not in COMPRESSIONS:
            raise ValueError(f"stream2 compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        self.compression = compression
        self._cache: dict[int, tuple[np.ndarray, cbor2.CBORTag]] = {}

    def start(self, source: str, run: int | str, meta: dict[str, Any], first: np.ndarray,
              count: int | None = None) -> list:
        first = np.asarray(first)
        p, h, w = first.shape if first.ndim == 3 else (1, *first.shape)
        msg: dict[str, Any] = {
            "type": "start", "series_id": _series_id(run), "series_unique_id": f"{source}-{run}",
            "arm_date": _dt.datetime.now(_dt.timezone.utc), "channels": [CHANNEL],
            "image_size_x": int(w), "image_size_y": int(p * h), "detector_description": f"peaknet-producer {source}",
        }
        if count:
            msg["number_of_images"] = int(count)
        if "photon_energy_ev" in meta:
            msg["incident_energy"] = float(meta["photon_energy_ev"])
        if "detector_distance_mm" in meta:
            msg["detector_translation"] = [0.0, 0.0, float(meta["detector_distance_mm"]) / 1e3]
        for key, name in (("beam_center_x_px", "beam_center_x"), ("beam_center_y_px", "beam_center_y"),
                          ("pixel_size_x_m", "pixel_size_x"), ("pixel_size_y_m", "pixel_size_y")):
            if key in meta:
                msg[name] = float(meta[key])
        return [cbor2.dumps(msg)]

    def frame(self, data: np.ndarray, source: str, seq: int, run: int | str, timestamp_ns: int | None,
              meta: dict[str, Any]) -> list:
        ts = int(timestamp_ns) if timestamp_ns is not None else time.time_ns()
        msg: dict[str, Any] = {
            "type": "image", "series_id": _series_id(run), "series_unique_id": f"{source}-{run}",
            "image_id": int(seq), "series_date": _EPOCH, "start_time": [ts, 10**9], "stop_time": [ts, 10**9],
            "real_time": [0, 10**9], "data": {CHANNEL: self._channel(data)},
        }
        if meta:
            msg["user_data"] = meta
        return [cbor2.dumps(msg)]

    def end(self, source: str, run: int | str, count: int) -> list:
        return [cbor2.dumps({"type": "end", "series_id": _series_id(run), "series_unique_id": f"{source}-{run}",
                             "number_of_images": int(count)})]

    def _channel(self, data: np.ndarray) -> cbor2.CBORTag:
        hit = self._cache.get(id(data))
        if hit is not None and hit[0] is data:
            return hit[1]
        array = np.asarray(data)
        image = array.reshape(-1, array.shape[-1]) if array.ndim == 3 else array
        if image.ndim != 2:
            raise ValueError(f"a frame is (panels, H, W) or (H, W), got shape {array.shape}")
        image = image.astype(image.dtype.newbyteorder("<"), copy=False)
        tag = channel_array(image, self.compression)
        if len(self._cache) >= CACHED_FRAMES:
            del self._cache[next(iter(self._cache))]  # the oldest
        self._cache[id(data)] = (data, tag)  # holding `data` keeps its id from being reused
        return tag
