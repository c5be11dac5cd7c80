"""The actor runtime on a GPU: frames pushed over ZeroMQ into ingest processes, through the
shared batch slots (registered as pinned memory) and the CUDA pipeline, give the same peaks as
the sequential reference, and every frame is accounted for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zmq

from harness import Results, free_port
from peaknet_daemon.config import config_from_dict
from peaknet_daemon.pipeline import run_sequential
from peaknet_daemon.pipeline_throughput import synthetic_frames
from peaknet_daemon.results import FramePeaks
from peaknet_daemon.wire import encode_frame
from peaknet_daemon.worker import Worker
from test_gpu_pipeline import assert_same_peaks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = (4, 128, 128)
N = 60


@pytest.mark.timeout(300)
@pytest.mark.parametrize("preset", ["classical", "peaknet-atto"])
def test_ingest_processes_to_gpu_give_the_reference_peaks(tmp_path, preset):
    port = free_port()
    results = Results(port)
    sockets = [{"endpoint": f"ipc://{tmp_path}/in{i}.ipc", "mode": "bind"} for i in range(2)]
    cfg = config_from_dict({
        "model": {"preset": preset, "checkpoint": "default" if preset == "peaknet-atto" else ""},
        "pipeline": {"frame_shape": list(SHAPE), "dtype": "float32", "batch_size": 4, "buffers": 3,
                     "max_batch_delay_ms": 5, "device": "cuda", "precision": "fp32", "max_peaks": 64},
        "ingest": {"sockets": sockets, "processes": 2},
        "output": {"results_endpoint": f"tcp://127.0.0.1:{port}"},
    }, "<test_gpu_runtime>")
    frames = synthetic_frames(N, SHAPE, seed=3)
    worker = Worker(cfg)
    assert worker.ring is not None and worker.pinned_bytes >= worker.ring.nbytes  # the ring is pinned
    ctx = zmq.Context()
    pushers = [ctx.socket(zmq.PUSH) for _ in sockets]
    try:
        for sock, spec in zip(pushers, sockets):
            sock.connect(spec["endpoint"])
        for i, frame in enumerate(frames):
            pushers[i % 2].send_multipart(encode_frame(frame, "gpu", i, run=1))
        got = results.wait_count(N, timeout=120)
        final = worker.stop()
    finally:
        for sock in pushers:
            sock.close(linger=0)
        ctx.term()
        results.close()
    assert final["received"] == final["processed"] == N and final["rejected"] == {}
    by_seq = {r["seq"]: r for r in got}
    assert sorted(by_seq) == list(range(N))
    ref = run_sequential(cfg, list(frames))
    mine = [FramePeaks(np.asarray(by_seq[i]["peaks"]["panel"]), np.asarray(by_seq[i]["peaks"]["y"], np.float32),
                       np.asarray(by_seq[i]["peaks"]["x"], np.float32),
                       np.asarray(by_seq[i]["peaks"]["intensity"], np.float32),
                       np.asarray(by_seq[i]["peaks"]["npix"]), by_seq[i]["n_peaks"], by_seq[i]["overflow"])
            for i in range(N)]
    assert sum(f.n_peaks for f in ref) > N  # the frames have peaks to compare
    # The daemon's batches are cut by arrival time, the reference's are full: a net's TF32
    # convolutions may then differ in the last bits (assert_same_peaks says why).
    assert_same_peaks(mine, ref, exact=preset == "classical")
