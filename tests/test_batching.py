"""The batch assembler: full batches, partial batches after the delay, concurrent fillers."""

import threading

import numpy as np

from peaknet_daemon.batching import BatchAssembler


class FakeSlot:
    def __init__(self, batch, shape):
        self.frames = np.zeros((batch, *shape), np.uint16)


class FakePipeline:
    """Records submissions; slots are always free."""

    def __init__(self, batch_size=4, shape=(1, 4, 4)):
        self.batch_size, self.shape = batch_size, shape
        self.submitted = []
        self.lock = threading.Lock()

    def acquire(self, timeout=None):
        return FakeSlot(self.batch_size, self.shape)

    def submit(self, slot, n, tags):
        with self.lock:
            self.submitted.append((slot.frames[:n].copy(), list(tags)))


def frame(value):
    return np.full((1, 4, 4), value, np.uint16)


def test_full_batches_are_submitted_with_their_tags_in_order():
    pipe = FakePipeline(batch_size=3)
    asm = BatchAssembler(pipe, max_delay_s=60, give_up=threading.Event())
    for i in range(6):
        assert asm.put(frame(i), i)
    assert [tags for _, tags in pipe.submitted] == [[0, 1, 2], [3, 4, 5]]
    for frames, tags in pipe.submitted:
        assert [int(f[0, 0, 0]) for f in frames] == tags


def test_partial_batch_waits_for_the_delay_then_goes():
    pipe = FakePipeline(batch_size=4)
    asm = BatchAssembler(pipe, max_delay_s=0.5, give_up=threading.Event())
    asm.put(frame(7), "a")
    asm.flush_due(now=0.0)  # long before the delay: nothing
    assert pipe.submitted == []
    opened = asm._open.opened_at
    asm.flush_due(now=opened + 0.5)
    assert [tags for _, tags in pipe.submitted] == [["a"]]
    asm.flush()  # nothing open: no empty batch
    assert len(pipe.submitted) == 1


def test_concurrent_fillers_lose_nothing():
    pipe = FakePipeline(batch_size=5)
    asm = BatchAssembler(pipe, max_delay_s=60, give_up=threading.Event())

    def fill(base):
        for i in range(200):
            asm.put(frame(base + i), base + i)

    threads = [threading.Thread(target=fill, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    asm.flush()
    seen = [tag for _, tags in pipe.submitted for tag in tags]
    assert sorted(seen) == sorted(k * 1000 + i for k in range(4) for i in range(200))
    for frames, tags in pipe.submitted:  # each tag sits with its own payload
        assert [int(f[0, 0, 0]) for f in frames] == [t % 65536 for t in tags]


def test_put_gives_up_only_when_told_and_no_slot_frees():
    class Full(FakePipeline):
        def acquire(self, timeout=None):
            return None

    give_up = threading.Event()
    give_up.set()
    asm = BatchAssembler(Full(), max_delay_s=1, give_up=give_up)
    assert asm.put(frame(1), 1) is False
