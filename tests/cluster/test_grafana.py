"""The Grafana dashboard for the serving metrics (cluster/grafana/lorafleet_serve.json): a dashboard Grafana loads
(unique panel ids, panels on the 24-column grid without overlaps, every query on the ``$datasource`` variable), every
query valid PromQL, every metric it reads one that serving/telemetry.py exports under the name Ray's metrics agent
gives it (the real export is checked in tests/serving/test_app.py), every exported metric shown, and ``lorafleet
up``'s copy of it into the folder of dashboards Ray's Grafana provisioning loads."""

from __future__ import annotations

import json
import re

import pytest

from cluster.local import GRAFANA_DASHBOARD, install_grafana_dashboard

RAY_LABELS = {"SessionName", "WorkerId", "NodeAddress", "Component", "Version", "le"}  # Ray's and histograms'
GRAFANA_VARS = {"$__rate_interval": "1m", "$SessionName": ".+", "$model": ".+"}


def dashboard() -> dict:
    return json.loads(GRAFANA_DASHBOARD.read_text())


def exported() -> dict[str, set[str]]:
    """Prometheus series names -> allowed label names, from the metrics GeneratorMetrics creates: Ray's agent
    prefixes ``ray_``, gives counters ``_total`` and histograms ``_bucket``/``_sum``/``_count``."""
    from ray.util import metrics

    from serving.telemetry import GeneratorMetrics

    names: dict[str, set[str]] = {}
    for metric in vars(GeneratorMetrics()).values():
        if not isinstance(metric, metrics.Metric):
            continue
        labels = set(metric._tag_keys) | RAY_LABELS
        suffixes = {metrics.Counter: ["_total"], metrics.Histogram: ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(type(metric), [""]):
            names[f"ray_{metric._name}{suffix}"] = labels
    return names


def queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable: Grafana's ``label_values(selector, label)``
    becomes ``count by (label) (selector)``, the PromQL that reads the same series and label."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in dash["panels"] for t in p["targets"]]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"])
            assert found, f"variable {v['name']}: not label_values(selector, label): {v['query']['query']}"
            out.append((f"variable {v['name']}", f"count by ({found[2]}) ({found[1]})"))
    return out


def promql(expr: str) -> str:
    """The query with Grafana's variables replaced by values Prometheus would see."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


def test_it_is_a_dashboard_grafana_loads():
    dash = dashboard()
    assert dash["uid"] == "lorafleet-serve" and dash["title"] and dash["schemaVersion"] >= 27
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        assert p["datasource"]["uid"] == "${datasource}" and p["description"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" and t["expr"] for t in p["targets"]), p["title"]


# counters of failures: Ray exports a counter's series once it was first incremented, so a healthy run (the real-export
# check in tests/serving/test_app.py) has none of these; their names are checked against serving/telemetry.py here
FIRST_EVENT_ONLY = {"ray_lorafleet_records_dropped_total"}


def test_every_query_parses_and_reads_only_exported_metrics_and_labels():
    import promql_parser

    names = exported()
    used: set[str] = set()
    for where, expr in queries(dashboard()):
        text = promql(expr)
        try:
            promql_parser.parse(text)
        except Exception as exc:  # noqa: BLE001 - the parser's own error type; the message names the problem
            pytest.fail(f"{where}: not PromQL ({exc}): {text}")
        metrics = set(re.findall(r"\bray_lorafleet_\w+", text))
        assert metrics, f"{where} reads no lorafleet metric: {text}"
        for m in metrics:
            assert m in names, f"{where} reads {m}, which serving/telemetry.py does not export ({sorted(names)})"
            used.add(m)
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", text))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text):
            labels |= {x.strip() for x in group.split(",") if x.strip()}
        allowed = set().union(*(names[m] for m in metrics))
        assert labels <= allowed, f"{where} uses labels {labels - allowed} no metric it reads has"
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in used}
    every = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in names}
    assert shown == every, f"exported but on no panel: {sorted(every - shown)}"


def test_up_copies_it_where_rays_grafana_provisioning_loads_dashboards(tmp_path):
    assert install_grafana_dashboard(tmp_path) is None  # no Grafana folder written by Ray: nothing to do
    folder = tmp_path / "session_x" / "metrics" / "grafana" / "dashboards"
    folder.mkdir(parents=True)
    (tmp_path / "session_latest").symlink_to(tmp_path / "session_x")  # as Ray links the current session
    copy = install_grafana_dashboard(tmp_path)
    assert copy == tmp_path / "session_latest/metrics/grafana/dashboards/lorafleet_serve_grafana_dashboard.json"
    assert json.loads((folder / copy.name).read_text()) == dashboard()
