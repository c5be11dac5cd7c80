"""The issue-11 counters reach Prometheus: CXI truncation, PUB drops, refused and dropped peers."""

from __future__ import annotations

import numpy as np

from harness import free_port, metrics_from
from test_worker import Pusher, wait_stats, worker_config
from peaknet_daemon.config import config_from_dict
from peaknet_daemon.worker import Worker


def test_actor_counters_are_exported_and_survive_polls():
    stats = {"actor": "a0", "incarnation": "x", "received": 5, "processed": 5, "peaks_truncated": 7,
             "auth_failures": 2, "peer_disconnects": 1, "results_dropped": {"no_subscriber": 3, "hwm": 1}}
    m = metrics_from([stats], [{**stats, "peaks_truncated": 9, "results_dropped": {"no_subscriber": 4, "hwm": 1}}])
    assert m.value("peaknet_peaks_truncated_total") == 9
    assert m.value("peaknet_auth_failures_total") == 2
    assert m.value("peaknet_ingest_disconnects_total") == 1
    assert m.value("peaknet_results_dropped_total", {"reason": "no_subscriber"}) == 4
    assert m.value("peaknet_results_dropped_total", {"reason": "hwm"}) == 1
    assert m.totals()["results_dropped"] == {"no_subscriber": 4, "hwm": 1}


def test_pub_results_without_subscriber_are_dropped_and_counted_by_the_worker(tmp_path):
    base = worker_config(tmp_path, f"tcp://127.0.0.1:{free_port()}")
    cfg = config_from_dict({"model": {"preset": "classical"},
                            "pipeline": {"frame_shape": list(base.pipeline.frame_shape), "dtype": "uint16",
                                         "batch_size": 4, "max_batch_delay_ms": 10, "buffers": 2, "device": "cpu"},
                            "ingest": {"sockets": [{"endpoint": f"ipc://{tmp_path}/in.ipc", "mode": "bind"}]},
                            "output": {"results_endpoint": base.output.results_endpoint, "results_mode": "pub",
                                       "results_bind": True}}, "<test>")
    worker = Worker(cfg)
    pusher = Pusher(worker.endpoints[0])
    try:
        pusher.send([np.zeros(cfg.pipeline.frame_shape, np.uint16)] * 6)
        stats = wait_stats(worker, lambda s: s["processed"] >= 6)
        assert stats["results_dropped"] == {"no_subscriber": 6}
        m = metrics_from([stats])
        assert m.value("peaknet_results_dropped_total", {"reason": "no_subscriber"}) == 6
    finally:
        worker.stop()
        pusher.close()
