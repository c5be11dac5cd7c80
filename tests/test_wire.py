"""Hostile headers and npz batches: each is rejected with its reason, valid ones pass unchanged."""

import io
import zipfile

import msgpack
import numpy as np
import pytest

from peaknet_daemon.wire import (INT64_MAX, MAX_META_KEYS, MAX_RUN_FRAMES, REASONS, Rejected,
                                 decode_header, encode_control, encode_frame)
from peaknet_daemon.sources.lclstreamer import NpzDecoder

SHAPE = (2, 8, 8)


def header(**changes):
    h = msgpack.unpackb(encode_frame(np.zeros(SHAPE, np.float32), "s", 0,
                                     meta={"photon_energy_ev": 9500.0})[0])
    h.update(changes)
    return msgpack.packb(h)


def reason_of(raw) -> str:
    with pytest.raises(Rejected) as info:
        decode_header(raw)
    assert info.value.reason in REASONS
    return info.value.reason


def nested(depth):
    m = {"x": 1}
    for _ in range(depth):
        m = {"m": m}
    return m


@pytest.mark.parametrize("meta, why", [
    (nested(200), "nested 200 deep"),
    ({"a": {"b": 1}}, "a map value"),
    ({"a": [1, [2]]}, "a nested list"),
    ({"photon_energy_ev": "9.5 keV"}, "a non-numeric energy"),
    ({"photon_energy_ev": float("nan")}, "NaN energy"),
    ({"photon_energy_ev": float("inf")}, "infinite energy"),
    ({"detector_distance_mm": -100.0}, "negative distance"),
    ({"detector_distance_mm": 0}, "zero distance"),
    ({"detector_distance_mm": True}, "a bool distance"),
    ({f"k{i}": i for i in range(MAX_META_KEYS + 1)}, "too many keys"),
    ({"k": "x" * 5000}, "a long string"),
    ({"k" * 300: 1}, "a long key"),
    ([1, 2], "not a map"),
])
def test_meta_must_be_a_flat_map_of_scalars(meta, why):
    assert reason_of(header(meta=meta)) == "bad_meta", why


def test_meta_integer_keys_are_not_msgpack_maps_we_accept():
    raw = msgpack.packb({**msgpack.unpackb(header()), "meta": {1: 2}}, strict_types=False)
    assert reason_of(raw) in ("not_msgpack", "bad_meta")  # strict_map_key refuses int keys


def test_valid_meta_passes_unchanged():
    meta = {"photon_energy_ev": 9500, "detector_distance_mm": 100.5, "tag": "x", "ok": True,
            "none": None, "truth_x": [1.5, 2.5]}
    assert decode_header(header(meta=meta)).meta == meta


@pytest.mark.parametrize("field, value", [
    ("seq", 2**63), ("seq", 2**64 - 1), ("seq", -1), ("timestamp_ns", 2**63), ("timestamp_ns", -5),
    ("run", 2**63),
])
def test_frame_integers_beyond_int64_are_out_of_range(field, value):
    assert reason_of(header(**{field: value})) == "out_of_range"


def test_end_count_is_bounded():
    def end(count):
        h = msgpack.unpackb(encode_control("end", "s", run=1, count=1)[0])
        return msgpack.packb({**h, "count": count})
    assert decode_header(end(MAX_RUN_FRAMES)).count == MAX_RUN_FRAMES
    assert reason_of(end(MAX_RUN_FRAMES + 1)) == "out_of_range"
    assert reason_of(end(2**64 - 1)) == "out_of_range"
    assert reason_of(end(-1)) == "out_of_range"
    assert reason_of(end("9")) == "bad_header"


def test_largest_int64_seq_is_accepted():
    assert decode_header(header(seq=INT64_MAX)).seq == INT64_MAX


def test_long_source_is_a_bad_header():
    assert reason_of(header(source="s" * 1000)) == "bad_header"


# ------------------------------------------------------------------------------------------------
# lclstreamer npz
# ------------------------------------------------------------------------------------------------

def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def npz_reason(decoder, payload) -> str:
    with pytest.raises(Rejected) as info:
        decoder.decode(payload)
    return info.value.reason


def test_npz_decompression_bomb_is_rejected_from_the_zip_directory():
    # 64 MB of zeros compress to ~64 KB; the limit is 1 MB: nothing may be inflated.
    dec = NpzDecoder(SHAPE, "float32", 1 << 20, "tcp://x:1")
    bomb = npz(detector_data=np.zeros((2**14, *SHAPE), np.float32))
    assert len(bomb) < 1 << 20
    assert npz_reason(dec, bomb) == "oversize"


def test_npz_header_claiming_a_huge_shape_is_rejected_before_allocation():
    small = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, *SHAPE), np.float32))
    np.lib.format.write_array_header_1_0(small, {**header, "shape": (10**11, *SHAPE)})
    small.write(np.zeros(SHAPE, np.float32).tobytes())
    raw = small.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("detector_data.npy", raw)
    dec = NpzDecoder(SHAPE, "float32", 1 << 20, "tcp://x:1")
    with pytest.raises(Rejected, match="header claims"):
        dec.decode(buf.getvalue())


def test_npz_float64_is_rejected_not_rounded():
    dec = NpzDecoder(SHAPE, "uint16", 1 << 20, "tcp://x:1")
    assert npz_reason(dec, npz(detector_data=np.full((1, *SHAPE), 70000.7))) == "wrong_dtype"
    dec32 = NpzDecoder(SHAPE, "float32", 1 << 20, "tcp://x:1")
    assert npz_reason(dec32, npz(detector_data=np.ones((1, *SHAPE), np.float64))) == "wrong_dtype"
    assert npz_reason(dec32, npz(detector_data=np.ones((1, *SHAPE), np.int32))) == "wrong_dtype"


def test_npz_safe_casts_pass_exactly():
    dec = NpzDecoder(SHAPE, "float32", 1 << 20, "tcp://x:1")
    data = np.arange(2 * np.prod(SHAPE), dtype=np.uint16).reshape(2, *SHAPE)
    frames = dec.decode(npz(detector_data=data))
    np.testing.assert_array_equal(np.stack([a for _, a in frames]), data.astype(np.float32))
    assert all(a.dtype == np.float32 for _, a in frames)


def test_npz_readers_number_frames_per_source_without_collisions():
    a, b = (NpzDecoder(SHAPE, "float32", 1 << 20, "tcp://daq:1") for _ in range(2))
    batch = npz(detector_data=np.ones((3, *SHAPE), np.float32), timestamp=np.array([1.0, 2.0, 3.0]))
    got = [(h.source, h.run, h.seq) for dec in (a, b, a) for h, _ in dec.decode(batch)]
    assert len(set(got)) == 9
    assert a.source != b.source and a.source.startswith("tcp://daq:1#")
    assert [seq for src, _, seq in got if src == a.source] == list(range(6))
    assert {run for _, run, _ in got} == {"npz"}


def test_npz_bad_batch_does_not_advance_seq():
    dec = NpzDecoder(SHAPE, "float32", 1 << 20, "tcp://x:1")
    assert npz_reason(dec, npz(detector_data=np.ones((2, 2, 8, 9), np.float32))) == "wrong_shape"
    assert npz_reason(dec, b"PK\x03\x04 truncated") == "bad_npz"
    assert [h.seq for h, _ in dec.decode(npz(detector_data=np.ones((1, *SHAPE), np.float32)))] == [0]
