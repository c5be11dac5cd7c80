"""Metrics: cumulative actor stats -> counter increments (restarts included), GPU gauges, HTTP."""

from __future__ import annotations

import types
import urllib.error
import urllib.request
from types import SimpleNamespace

from peaknet_daemon.metrics import Metrics


def stats(actor="a0", received=0, processed=0, rejected=None, peaks=0, hits=0, **kw):
    return {"actor": actor, "received": received, "processed": processed, "rejected": rejected or {},
            "missing": kw.pop("missing", 0), "peaks": peaks, "hits": hits, **kw}


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_cumulative_totals_become_increments():
    clock = Clock()
    m = Metrics(clock=clock)
    m.update_from_stats([stats("a0", 10, 8, {"wrong_shape": 2}, peaks=30, hits=3, batch_sizes=[4, 4],
                               latencies_s=[0.01, 0.02]),
                         stats("a1", 5, 5, peaks=5)])
    clock.t += 2.0
    m.update_from_stats([stats("a0", 30, 26, {"wrong_shape": 3, "not_msgpack": 1}, peaks=90, hits=9, batch_sizes=[8]),
                         stats("a1", 5, 5, peaks=5)])
    t = m.totals()
    assert t["frames_received"] == 35 and t["frames_processed"] == 31
    assert t["peaks_found"] == 95 and t["hits"] == 9
    assert t["frames_rejected"] == {"wrong_shape": 3, "not_msgpack": 1}
    assert t["actor_restarts"] == 0 and t["actors_alive"] == 2
    assert t["rate_fps"] == 9.0  # 18 more processed in 2 s
    assert m.value("batch_size_count") == 3 and m.value("batch_size_sum") == 16
    assert m.value("latency_seconds_count") == 2


def test_restart_counts_new_totals_fresh():
    m = Metrics()
    m.update_from_stats([stats("a0", 100, 90, {"non_finite": 4}, peaks=500, restarts=0)])
    # the actor died and came back: its totals start again from zero
    m.update_from_stats([stats("a0", 7, 6, {"non_finite": 1}, peaks=20, restarts=1)])
    t = m.totals()
    assert t["frames_received"] == 107 and t["frames_processed"] == 96 and t["peaks_found"] == 520
    assert t["frames_rejected"] == {"non_finite": 5}
    assert t["actor_restarts"] == 1
    assert t["frames_lost_in_restart"] == 6  # 100 received - 90 processed - 4 rejected, in flight
    # after the restart, increments are relative to the new totals again
    m.update_from_stats([stats("a0", 10, 9, {"non_finite": 1}, peaks=25, restarts=1)])
    assert m.totals()["frames_received"] == 110 and m.totals()["actor_restarts"] == 1


def test_restart_detected_by_a_total_going_down_without_restarts_key():
    m = Metrics()
    m.update_from_stats([stats("a0", 50, 50)])
    m.update_from_stats([stats("a0", 3, 3)])
    t = m.totals()
    assert t["frames_received"] == 53 and t["actor_restarts"] == 1 and t["frames_lost_in_restart"] == 0
    m.record_restart(frames_lost=4)
    assert m.totals()["actor_restarts"] == 2 and m.totals()["frames_lost_in_restart"] == 4


def test_gauges_and_sink_errors():
    m = Metrics()
    m.update_from_stats([stats("a0", rss_bytes=123, device_mem_bytes=456, sink_errors={"cxi": 2}),
                         stats("a1", alive=False)])
    m.update_from_stats([stats("a0", rss_bytes=124, device_mem_bytes=456, sink_errors={"cxi": 5, "results": 1}),
                         stats("a1", alive=False)])
    assert m.value("process_rss_bytes", {"process": "a0"}) == 124
    assert m.value("process_rss_bytes", {"process": "supervisor"}) > 0
    assert m.value("device_memory_allocated_bytes", {"actor": "a0"}) == 456
    assert m.totals()["sink_errors"] == {"cxi": 5, "results": 1}
    assert m.totals()["actors_alive"] == 1


def fake_nvml(fail_init=False):
    m = types.ModuleType("fake_pynvml")

    class NVMLError(Exception):
        pass

    m.NVMLError, m.NVML_TEMPERATURE_GPU = NVMLError, 0
    m.inits = 0

    def init():
        m.inits += 1
        if fail_init:
            raise NVMLError("Library not found")

    def temp(h, sensor):
        if h == 1:
            raise NVMLError("Not Supported")
        return 50 + h

    m.nvmlInit, m.nvmlShutdown = init, lambda: None
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=70 + h, memory=0)
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=1000 * (h + 1), free=0, total=0)
    m.nvmlDeviceGetTemperature = temp
    return m


def test_update_gpus():
    nvml = fake_nvml()
    m = Metrics(nvml=nvml)
    assert m.update_gpus() and m.update_gpus()
    assert nvml.inits == 1
    assert m.value("gpu_utilization_percent", {"gpu": "1"}) == 71
    assert m.value("gpu_memory_used_bytes", {"gpu": "1"}) == 2000
    assert m.value("gpu_temperature_celsius", {"gpu": "0"}) == 50
    assert m.registry.get_sample_value("peaknet_gpu_temperature_celsius", {"gpu": "1"}) is None
    broken = fake_nvml(fail_init=True)
    m2 = Metrics(nvml=broken)
    assert not m2.update_gpus() and not m2.update_gpus()
    assert broken.inits == 1  # gives up after the library is missing once


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_endpoint():
    state = {"healthy": True, "ready": False}
    m = Metrics()
    m.update_from_stats([stats("a0", 12, 11, {"bad_header": 1})])
    server, port = m.serve("127.0.0.1", 0, healthy=lambda: state["healthy"], ready=lambda: state["ready"])
    try:
        assert port > 0
        base = f"http://127.0.0.1:{port}"
        code, text = get(base + "/metrics")
        assert code == 200
        assert "peaknet_frames_received_total 12.0" in text
        assert 'peaknet_frames_rejected_total{reason="bad_header"} 1.0' in text
        assert "python_gc" not in text  # our registry, not the global default one
        assert get(base + "/healthz") == (200, "ok\n")
        assert get(base + "/readyz")[0] == 503
        state.update(healthy=False, ready=True)
        assert get(base + "/healthz")[0] == 503
        assert get(base + "/readyz")[0] == 200
        assert get(base + "/nope")[0] == 404
    finally:
        m.stop()
        m.stop()


def test_two_instances_do_not_share_state():
    a, b = Metrics(), Metrics()
    a.update_from_stats([stats("x", 5, 5)])
    assert a.totals()["frames_received"] == 5 and b.totals()["frames_received"] == 0


def test_supervisor_totals_are_authoritative():
    m = Metrics()
    m.update_from_stats([stats("a0", 10, 8, missing=3, incarnation="x1")], missing_total=2,
                        lost_in_restart_total=0, actors_alive=3)
    # a new incarnation is a restart even when totals went up; the supervisor counted the loss
    m.update_from_stats([stats("a0", 12, 12, incarnation="x2", restarts=1)], missing_total=5,
                        lost_in_restart_total=2, actors_alive=3)
    t = m.totals()
    assert t["frames_missing"] == 5          # the actors' 'missing' keys are ignored
    assert t["frames_lost_in_restart"] == 2  # no estimate of our own on top
    assert t["actor_restarts"] == 1 and t["actors_alive"] == 3
    assert t["frames_received"] == 22        # 10, then 12 fresh after the restart
    m.set_rate(42.5)
    m.update_from_stats([stats("a0", 20, 20, incarnation="x2", restarts=1)])
    assert m.totals()["rate_fps"] == 42.5    # not overwritten once the caller sets it
