"""Ingest: every message ends as a frame, a control event or a rejection counted by reason."""

import multiprocessing
import threading

import msgpack
import numpy as np
import pytest
import zmq

from peaknet_daemon.config import SocketConfig
from peaknet_daemon.ingest import SocketReader, socket_endpoint
from peaknet_daemon.ingest_process import BUSY_BATCHES, BUSY_POLL_MS, HOLD_MAX_S, _Filler
from peaknet_daemon.shm_ring import SharedRing
from peaknet_daemon.sources import FrameTag
from peaknet_daemon.wire import encode_control, encode_frame

SHAPE, DTYPE = (2, 8, 8), "float32"


class Collector:
    """A FrameOut (sources/base.py) that keeps what the sources decoded, and the rejections."""

    def __init__(self):
        self.frames, self.controls, self.rejects = [], [], []
        self.cond = threading.Condition()
        self.buffer = np.empty(SHAPE, np.dtype(DTYPE))

    def slot(self):
        return self.buffer

    def commit(self, tag):
        with self.cond:
            self.frames.append((self.buffer.copy(), tag))
            self.cond.notify_all()

    def control(self, event):
        with self.cond:
            self.controls.append(event)
            self.cond.notify_all()

    def on_reject(self, reason, detail):
        with self.cond:
            self.rejects.append(reason)
            self.cond.notify_all()

    def wait_total(self, n, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.frames) + len(self.controls) + len(self.rejects) >= n,
                                      timeout), (self.frames, self.controls, self.rejects)


def bad_messages():
    good = np.ones(SHAPE, np.float32)
    header = msgpack.unpackb(encode_frame(good, "s", 0)[0])

    def with_header(**changes):
        h = {**header, **changes}
        for k, v in list(h.items()):
            if v is None:
                del h[k]
        return [msgpack.packb(h), good.tobytes()]

    return [
        ("not_msgpack", [b"\xc1\xc1\xc1 random bytes"]),
        ("not_msgpack", [b"\xc1", good.tobytes()]),
        ("bad_header", [msgpack.packb([1, 2, 3]), good.tobytes()]),
        ("unknown_proto", with_header(proto="peaknet/0")),
        ("unknown_proto", with_header(proto=None)),
        ("unknown_type", with_header(type="frames")),
        ("bad_header", with_header(seq="one")),
        ("wrong_shape", with_header(shape=[2, 8, 9])),
        ("wrong_shape", with_header(shape="2x8x8")),
        ("wrong_dtype", with_header(dtype="float64")),
        ("wrong_dtype", with_header(dtype="uint16")),
        ("size_mismatch", [msgpack.packb(header), good.tobytes()[:-4]]),
        ("wrong_parts", [msgpack.packb(header)]),
        ("oversize", [msgpack.packb(header), good.tobytes() * 100, good.tobytes() * 100]),  # parts < limit
        ("bad_meta", with_header(meta={"a": {"b": {"c": 1}}})),
        ("bad_meta", with_header(meta={"photon_energy_ev": "9.5 keV"})),
        ("out_of_range", with_header(seq=2**63)),
    ]


@pytest.fixture
def open_reader(tmp_path):
    """open_reader(format) -> (collector, PUSH socket) with a SocketReader bound and running."""
    ctx = zmq.Context()
    running = []

    def open_(fmt: str = "peaknet/1"):
        col = Collector()
        endpoint = f"ipc://{tmp_path}/in{len(running)}.sock"
        cfg = SocketConfig(endpoint=endpoint, mode="bind", format=fmt, max_message_bytes=64 * 1024)
        reader = SocketReader(ctx, cfg, endpoint, SHAPE, DTYPE, col, col.on_reject)
        stop = threading.Event()
        thread = threading.Thread(target=reader.run, args=(stop,))
        thread.start()
        push = ctx.socket(zmq.PUSH)
        push.connect(endpoint)
        running.append((stop, thread, push))
        return col, push

    yield open_
    for stop, thread, push in running:
        stop.set()
        thread.join()
        push.close(linger=0)
    ctx.term()


def test_bad_messages_are_rejected_by_reason_and_good_ones_interleaved_pass(open_reader):
    col, push = open_reader()
    bad = bad_messages()
    push.send_multipart(encode_control("start", "s", run=3))
    sent_good = []
    for i, (_, parts) in enumerate(bad):
        push.send_multipart(parts)
        frame = np.full(SHAPE, i, np.float32)
        push.send_multipart(encode_frame(frame, "s", i, run=3))
        sent_good.append(frame)
    push.send_multipart(encode_control("end", "s", run=3, count=len(sent_good)))
    col.wait_total(2 + 2 * len(bad))
    assert col.rejects == [reason for reason, _ in bad]
    assert [tag.seq for _, tag in col.frames] == list(range(len(bad)))
    for (array, tag), sent in zip(col.frames, sent_good):
        np.testing.assert_array_equal(array, sent)
        assert tag.run == 3 and tag.source == "s" and tag.received_at > 0
    assert [(c.type, c.count) for c in col.controls] == [("start", 0), ("end", len(bad))]


def test_bind_endpoint_is_base_port_plus_actor_index():
    sock = SocketConfig(endpoint="tcp://0.0.0.0:6000", mode="bind")
    assert [socket_endpoint(sock, i) for i in range(3)] == [f"tcp://0.0.0.0:{6000 + i}" for i in range(3)]
    assert socket_endpoint(SocketConfig(endpoint="tcp://daq:6000", mode="connect"), 2) == "tcp://daq:6000"


def test_lclstreamer_npz_batches_become_frames(open_reader):
    import io
    col, push = open_reader("lclstreamer-npz")
    data = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, detector_data=data, timestamp=np.array([1.0, 2.0, 3.0]), photon_wavelength=np.full(3, 1.3))
    push.send(buf.getvalue())
    push.send(b"not an npz")
    col.wait_total(4)
    assert col.rejects == ["bad_npz"]
    assert [tag.seq for _, tag in col.frames] == [0, 1, 2]
    np.testing.assert_array_equal(np.stack([a for a, _ in col.frames]), data)
    assert col.frames[0][1].meta["photon_energy_ev"] == pytest.approx(12398.4198 / 1.3)


def test_a_part_over_max_message_bytes_is_refused_by_zmq_unread(open_reader):
    """ZMQ_MAXMSGSIZE: libzmq drops the connection of a peer that sends a part over the limit,
    without buffering it; the peer reconnects and later messages arrive."""
    col, push = open_reader()
    assert push.send_multipart([b"\0" * (128 * 1024)]) is None
    deadline_frames = 0
    for seq in range(200):  # keep sending until the reconnected pipe delivers
        push.send_multipart(encode_frame(np.full(SHAPE, seq, np.float32), "s", seq))
        with col.cond:
            if col.cond.wait_for(lambda: col.frames, 0.05):
                deadline_frames = len(col.frames)
                break
    assert deadline_frames >= 1
    assert col.rejects == []  # never received, so never a rejection: the monitor counts the drop


def test_a_due_partial_batch_waits_while_the_device_is_busy():
    """An ingest process sends a partial batch once it is `max_batch_delay_ms` old and the device
    has room (the ring's in-flight gauge below BUSY_BATCHES), or once it is HOLD_MAX_S old."""
    ring = SharedRing.create(slots=2, batch=4, frame_shape=SHAPE, dtype=DTYPE, rows=1)
    gpu, ingest = multiprocessing.Pipe()
    try:
        filler = _Filler(ring, 0, ingest, max_delay_s=0.02, reject_log_s=60)
        gpu.send_bytes(msgpack.packb(["slot", 0]))
        filler.slot()[:] = 1.0
        filler.commit(FrameTag("s", 0, 1, 0))
        opened = filler.opened_at

        filler.flush_due(opened + 0.01)  # not due yet
        assert not gpu.poll()
        ring.in_flight[0] = BUSY_BATCHES
        filler.flush_due(opened + 0.05)  # due, but the device is busy: held, and looked at often
        assert not gpu.poll()
        assert filler.ms_until_due(opened + 0.05) == BUSY_POLL_MS
        ring.in_flight[0] = BUSY_BATCHES - 1
        filler.flush_due(opened + 0.05)  # the device has room: it goes
        assert msgpack.unpackb(gpu.recv_bytes())[:3] == ["batch", 0, 1]

        gpu.send_bytes(msgpack.packb(["slot", 1]))
        filler.slot()[:] = 2.0
        filler.commit(FrameTag("s", 1, 1, 0))
        ring.in_flight[0] = 10  # a device that stays busy holds a partial batch for HOLD_MAX_S at most
        filler.flush_due(filler.opened_at + HOLD_MAX_S - 0.01)
        assert not gpu.poll()
        filler.flush_due(filler.opened_at + HOLD_MAX_S)
        assert msgpack.unpackb(gpu.recv_bytes())[:3] == ["batch", 1, 1]
    finally:
        gpu.close()
        ingest.close()
        ring.close()
