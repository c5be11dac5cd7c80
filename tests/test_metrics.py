"""Metrics: a display of the accounting's totals and the actors' gauges, GPU gauges, HTTP."""

from __future__ import annotations

import types
import urllib.error
import urllib.request
from types import SimpleNamespace

from peaknet_daemon.accounting import Accounting
from peaknet_daemon.metrics import Metrics


def stats(actor="a0", received=0, processed=0, rejected=None, peaks=0, hits=0, index=0, incarnation="i0", **kw):
    return {"actor": actor, "index": index, "incarnation": incarnation, "received": received,
            "processed": processed, "rejected": rejected or {}, "peaks": peaks, "hits": hits,
            "runs": [], "controls": [], **kw}


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def show(m: Metrics, acc: Accounting, polled: list[dict]) -> None:
    """One supervisor round: the accounting folds the stats, metrics display its totals."""
    acc.observe(polled, 0.0)
    m.update(acc.totals(), polled)


def test_totals_become_counters_and_stats_feed_histograms():
    clock = Clock()
    m, acc = Metrics(clock=clock), Accounting(grace_s=10)
    show(m, acc, [stats("a0", 10, 8, {"wrong_shape": 2}, peaks=30, hits=3, batch_sizes=[4, 4],
                        latencies_s=[0.01, 0.02]),
                  stats("a1", 5, 5, peaks=5, index=1)])
    clock.t += 2.0
    show(m, acc, [stats("a0", 30, 26, {"wrong_shape": 3, "not_msgpack": 1}, peaks=90, hits=9, batch_sizes=[8]),
                  stats("a1", 5, 5, peaks=5, index=1)])
    t = m.totals()
    assert t["frames_received"] == 35 and t["frames_processed"] == 31
    assert t["peaks_found"] == 95 and t["hits"] == 9
    assert t["frames_rejected"] == {"wrong_shape": 3, "not_msgpack": 1}
    assert t["actor_restarts"] == 0 and t["actors_alive"] == 2
    assert t["rate_fps"] == 9.0  # 18 more processed in 2 s
    assert m.value("batch_size_count") == 3 and m.value("batch_size_sum") == 16
    assert m.value("latency_seconds_count") == 2


def test_a_restart_shows_the_accountings_totals():
    m, acc = Metrics(), Accounting(grace_s=10)
    show(m, acc, [stats("a0", 100, 90, {"non_finite": 4}, peaks=500, in_flight=6)])
    # the actor died and came back under a new incarnation: its totals start again from zero
    show(m, acc, [stats("a0", 7, 6, {"non_finite": 1}, peaks=20, incarnation="i1")])
    t = m.totals()
    assert t["frames_received"] == 107 and t["frames_processed"] == 96 and t["peaks_found"] == 520
    assert t["frames_rejected"] == {"non_finite": 5}
    assert t["actor_restarts"] == 1
    assert t["frames_lost_in_restart"] == 6  # what the dead incarnation had in flight
    show(m, acc, [stats("a0", 10, 9, {"non_finite": 1}, peaks=25, incarnation="i1")])
    assert m.totals()["frames_received"] == 110 and m.totals()["actor_restarts"] == 1


def test_ingest_slot_wait_sums_over_actors_and_incarnations():
    m, acc = Metrics(), Accounting(grace_s=10)
    show(m, acc, [stats("a0", ingest_slot_wait_ms=1500), stats("a1", index=1, ingest_slot_wait_ms=20)])
    show(m, acc, [stats("a0", ingest_slot_wait_ms=40, incarnation="i1"), stats("a1", index=1, ingest_slot_wait_ms=25)])
    assert m.value("ingest_slot_wait_milliseconds_total") == 1500 + 40 + 25


def test_gauges_sink_errors_thread_failures_and_drops():
    m = Metrics()
    m.update({"sink_errors": {"cxi": 2}, "thread_failures": {"results": 1}, "results_dropped": {"hwm": 3}},
             [stats("a0", rss_bytes=123, device_mem_bytes=456, in_flight=4, health={"healthy": False})])
    m.update({"sink_errors": {"cxi": 5, "results": 1}, "thread_failures": {"results": 1},
              "results_dropped": {"hwm": 7}}, [stats("a0", rss_bytes=124, device_mem_bytes=456)])
    assert m.value("process_rss_bytes", {"process": "a0"}) == 124
    assert m.value("process_rss_bytes", {"process": "supervisor"}) > 0
    assert m.value("device_memory_allocated_bytes", {"actor": "a0"}) == 456
    assert m.value("frames_in_flight", {"actor": "a0"}) == 4
    assert m.value("actor_healthy", {"actor": "a0"}) == 0
    t = m.totals()
    assert t["sink_errors"] == {"cxi": 5, "results": 1}
    assert t["thread_failures"] == {"results": 1} and t["results_dropped"] == {"hwm": 7}
    assert t["actors_alive"] == 1


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
    m.update({"received": 12, "processed": 11, "rejected": {"bad_header": 1}})
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
    a.update({"received": 5, "processed": 5})
    assert a.totals()["frames_received"] == 5 and b.totals()["frames_received"] == 0


def test_counters_never_go_back_and_a_set_rate_stays():
    m = Metrics()
    m.update({"received": 10, "missing": 2, "lost_in_restart": 1, "restarts": 1}, actors_alive=3)
    m.update({"received": 8, "missing": 5, "lost_in_restart": 1, "restarts": 1}, actors_alive=3)
    t = m.totals()
    assert t["frames_received"] == 10 and t["frames_missing"] == 5 and t["frames_lost_in_restart"] == 1
    assert t["actor_restarts"] == 1 and t["actors_alive"] == 3
    m.set_rate(42.5)
    m.update({"received": 20})
    assert m.totals()["rate_fps"] == 42.5    # not overwritten once the caller sets it
