"""systemd/grafana-dashboard.json queries only what the daemon exports (daemon/metrics.py's
registry: metric names, and the labels they aggregate or print), and shows every metric."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peaknet_daemon.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "systemd" / "grafana-dashboard.json"


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every sample name the registry exports -> its label names (each labelled metric fed once)."""
    m = Metrics()
    m.update({"received": 2, "processed": 1, "peaks": 3, "hits": 1, "missing": 1, "control_messages": 1,
              "restarts": 1, "lost_in_restart": 1, "peaks_truncated": 1, "auth_failures": 1, "peer_disconnects": 1,
              "rejected": {"bad_header": 1}, "sink_errors": {"cxi": 1}, "thread_failures": {"results": 1},
              "results_dropped": {"hwm": 1}},
             [{"actor": "h/0", "batch_sizes": [1], "latencies_s": [0.01], "rss_bytes": 1, "device_mem_bytes": 1,
               "in_flight": 0, "health": {"healthy": True}}])
    for gauge in (m.gpu_utilization, m.gpu_memory_used, m.gpu_temperature):
        gauge.labels("0").set(1)
    names: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every target."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dash["panels"] for t in p["targets"]]


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["name"] == "DS_PROMETHEUS" and dash["uid"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]


def test_every_query_uses_exported_metrics_and_labels(exported):
    for title, expr, legend in queries():
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), (title, expr)
        metrics = re.findall(r"\bpeaknet_\w+", expr)
        assert metrics, (title, expr)
        unknown = [name for name in metrics if name not in exported]
        assert not unknown, f"panel {title!r} queries {unknown}, not exported by daemon/metrics.py"
        labels = set().union(*(exported[name] for name in metrics))
        used = set(re.findall(r"\bby \(([^)]*)\)", expr))
        used = {label.strip() for group in used for label in group.split(",")}
        used |= set(re.findall(r"\{\{(\w+)\}\}", legend))
        assert used <= labels, f"panel {title!r} uses labels {used - labels} its metrics do not have"


def test_every_exported_metric_is_on_the_dashboard(exported):
    text = " ".join(expr for _, expr, _ in queries())
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in exported}
    missing = sorted(f for f in families if not re.search(rf"\b{f}(_total|_bucket|_sum|_count)?\b", text))
    assert not missing, f"metrics without a dashboard panel: {missing}"
