"""EIGER Stream V1 (README, Protocols): a run sent as an EIGER's SIMPLON 1.x stream would send a
series, so the daemon's `eiger-v1` source (and any EIGER client) can be tested without a detector."""

from __future__ import annotations

import json
import time
from typing import Any

import bitshuffle
import lz4.block
import numpy as np

from peaknet_daemon.wire import HC_EV_ANGSTROM

from ..errors import ProducerError

from . import COMPRESSIONS as _FORMATS_COMPRESSIONS  # the registry (loaded first)

COMPRESSIONS = _FORMATS_COMPRESSIONS["eiger-v1"]
WIRE_TYPES = ("uint8", "uint16", "uint32", "int32", "float32")  # the types the eiger-v1 source reads
BLOCK_BYTES = 8192  # the EIGER's bitshuffle block, as its 12-byte prefix states


class EigerV1Encoder:
    """A `dheader-1.0` (header_detail basic), one `dimage-1.0` message per frame and
    `dseries_end-1.0`. The (panels, H, W) frame goes as one (panels x H, W) image, bitshuffle-LZ4
    with the EIGER's 12-byte prefix by default. The run is the series id, so it must be an int.
    The header's config carries what the start meta gives (photon energy, detector distance);
    the format has no per-frame metadata, and no image count, as the sender does not know it
    when the run starts."""

    def __init__(self, compression: str = "bslz4"):
        if compression not in COMPRESSIONS:
            raise ValueError(f"eiger-v1 compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        self.compression = compression

    def start(self, source: str, run: int | str, meta: dict[str, Any], first: np.ndarray,
              count: int | None = None) -> list:
        image = _image(first)
        config: dict[str, Any] = {
            "description": f"peaknet-producer {source}",
            "x_pixels_in_detector": image.shape[1], "y_pixels_in_detector": image.shape[0],
            "bit_depth_image": image.dtype.itemsize * 8, "ntrigger": 1,
            "compression": self.compression,
        }
        energy, distance = meta.get("photon_energy_ev"), meta.get("detector_distance_mm")
        if isinstance(energy, (int, float)) and energy > 0:
            config["photon_energy"] = float(energy)
            config["wavelength"] = HC_EV_ANGSTROM / float(energy)
        if isinstance(distance, (int, float)) and distance > 0:
            config["detector_distance"] = float(distance) / 1e3
        if count:
            config["nimages"] = int(count)  # the daemon then settles the run at its series end
        head = {"htype": "dheader-1.0", "series": _series(run), "header_detail": "basic"}
        return [json.dumps(head).encode(), json.dumps(config).encode()]

    def frame(self, data: np.ndarray, source: str, seq: int, run: int | str, timestamp_ns: int | None,
              meta: dict[str, Any]) -> list:
        image = _image(data)
        type_name = image.dtype.name
        if type_name not in WIRE_TYPES:
            raise ProducerError(f"eiger-v1 sends {', '.join(WIRE_TYPES)} pixels, not {type_name}")
        blob, encoding = self._encode(image)
        ts = int(time.time_ns() if timestamp_ns is None else timestamp_ns)
        return [
            json.dumps({"htype": "dimage-1.0", "series": _series(run), "frame": int(seq), "hash": ""}).encode(),
            json.dumps({"htype": "dimage_d-1.0", "shape": [image.shape[1], image.shape[0]], "type": type_name,
                        "encoding": encoding, "size": len(blob)}).encode(),
            blob,
            json.dumps({"htype": "dconfig-1.0", "start_time": ts, "stop_time": ts, "real_time": 0}).encode(),
        ]

    def end(self, source: str, run: int | str, count: int) -> list:
        return [json.dumps({"htype": "dseries_end-1.0", "series": _series(run)}).encode()]

    def _encode(self, image: np.ndarray) -> tuple[bytes | memoryview, str]:
        if self.compression == "none":
            return memoryview(image).cast("B"), "<"
        if self.compression == "lz4":
            return lz4.block.compress(image, store_size=False), "lz4<"
        size = image.dtype.itemsize
        blocks = bitshuffle.compress_lz4(image, BLOCK_BYTES // size)
        prefix = image.nbytes.to_bytes(8, "big") + BLOCK_BYTES.to_bytes(4, "big")
        return prefix + blocks.tobytes(), f"bs{8 * size}-lz4<"


def _image(frame: np.ndarray) -> np.ndarray:
    """A (panels, H, W) or (H, W) frame as the one little-endian 2-D image an EIGER sends."""
    a = np.asarray(frame)
    if a.ndim == 3:
        a = a.reshape(a.shape[0] * a.shape[1], a.shape[2])
    if a.ndim != 2:
        raise ProducerError(f"a frame is (panels, H, W) or (H, W), got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def _series(run: int | str) -> int:
    """EIGER series ids are integers."""
    if isinstance(run, int) and not isinstance(run, bool) and run >= 0:
        return run
    if isinstance(run, str) and run.isdigit():
        return int(run)
    raise ProducerError(f"eiger-v1 needs an integer run (the series id), got {run!r}")
