"""The Grafana dashboard and its provisioning: the panels it must have, their queries, and that every metric
they name is one the service exports. tests/deploy/test_prometheus.py runs every query on a real Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import Metrics
from tests.deploy.conftest import DEPLOY

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "rnnserve.json"

REQUIRED_PANELS = {
    "Step latency percentiles",
    "Step latency heatmap",
    "Step latency p99 by pod",
    "Steps and replays per second",
    "Steps per second by pod",
    "Batch size",
    "Queue wait",
    "Runtime latency",
    "Store load and commit latency",
    "Active sessions",
    "Active streams",
    "Errors by code",
    "Commit conflicts",
    "Expired sessions",
}
VARIABLES = {"datasource", "job", "instance", "model", "version"}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed panels included, rows themselves not."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_expressions(board: dict[str, Any]) -> dict[str, str]:
    """'panel title / refId' -> PromQL, for every target of every panel."""
    return {f"{p['title']} / {t['refId']}": t["expr"] for p in panels(board) for t in p["targets"]}


def datasource_references(node: Any) -> Iterator[Any]:
    """Every `datasource` value anywhere in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            else:
                yield from datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_references(item)


def variable_queries(board: dict[str, Any]) -> dict[str, str]:
    """Template variable name -> its `label_values(...)` query (the data source variable has none)."""
    return {v["name"]: v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"}


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus can run it: every template variable matches anything, the rate
    interval is a minute, and `label_values(selector, label)` becomes `group by (label) (selector)`."""
    expr = expr.replace("$__rate_interval", "1m")
    expr = re.sub(r'"\$\w+"', '".*"', expr)
    label_values = re.fullmatch(r"label_values\((.*), *(\w+)\)", expr)
    if label_values:
        return f"group by ({label_values[2]}) ({label_values[1]})"
    return expr


def exported_metrics() -> set[str]:
    """The names service/metrics.py registers, as /metrics spells them (`_total` on counters)."""
    registry = CollectorRegistry()
    Metrics(registry)
    return set(re.findall(r"^# TYPE (rnnserve_\w+) ", generate_latest(registry).decode(), re.M))


def metric_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in re.findall(r"rnnserve_\w+", expr)}


def test_the_dashboard_is_provisioning_ready() -> None:
    board = dashboard()
    assert board["uid"] == "rnnserve-overview"
    assert board["title"] == "rnnserve"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board.get("id") is None, "a provisioned dashboard has no database id"
    names = [v["name"] for v in board["templating"]["list"]]
    assert set(names) == VARIABLES and len(names) == len(VARIABLES)
    # No data source uid is fixed anywhere: every reference goes through the ${datasource} variable.
    references = list(datasource_references(board))
    others = [r for r in references if r != {"type": "prometheus", "uid": "${datasource}"}]
    assert others == [{"type": "grafana", "uid": "-- Grafana --"}], "only the built-in annotations may differ"
    assert len(references) > len(REQUIRED_PANELS)


def test_the_dashboard_has_the_required_panels_each_with_queries() -> None:
    board = dashboard()
    titles = [p["title"] for p in panels(board)]
    assert REQUIRED_PANELS <= set(titles), f"missing: {sorted(REQUIRED_PANELS - set(titles))}"
    assert len(titles) == len(set(titles)), "panel titles repeat"
    ids = [p["id"] for p in board["panels"]] + [p["id"] for row in board["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(board):
        assert panel["targets"], f"{panel['title']} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds repeat"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']} has an empty query"
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    rows = {p["title"] for p in board["panels"] if p["type"] == "row"}
    assert {"Step latency", "Errors", "Sessions and streams"} <= rows


def test_latency_panels_use_histogram_quantiles_and_a_heatmap() -> None:
    board = dashboard()
    by_title = {p["title"]: p for p in panels(board)}
    percentiles = [t["expr"] for t in by_title["Step latency percentiles"]["targets"]]
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(e.startswith(f"histogram_quantile({quantile}, ") for e in percentiles), quantile
    assert all("rnnserve_step_latency_seconds_bucket" in e and "le" in e for e in percentiles)
    heatmap = by_title["Step latency heatmap"]
    assert heatmap["type"] == "heatmap"
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap" and "rnnserve_step_latency_seconds_bucket" in target["expr"]


def test_panels_follow_the_template_variables() -> None:
    """Per-model panels filter on job, pod, model and version; the rest on job and pod."""
    for name, expr in panel_expressions(dashboard()).items():
        assert "$__rate_interval" in expr or "rate(" not in expr, name
        for metric in metric_names(expr):
            for selector in re.findall(rf"{metric}\w*\{{([^}}]*)\}}", expr):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, name
                # The errors carry no model label: a ratio over them covers every model.
                per_model = {"rnnserve_steps_total", "rnnserve_step_latency_seconds", "rnnserve_batch_size"}
                if metric in per_model and "rnnserve_errors_total" not in expr:
                    assert 'model=~"$model"' in selector and 'version=~"$version"' in selector, name


def test_every_metric_the_dashboard_names_is_exported() -> None:
    board = dashboard()
    exported = exported_metrics()
    used = set().union(*map(metric_names, [*panel_expressions(board).values(), *variable_queries(board).values()]))
    assert {"rnnserve_step_latency_seconds", "rnnserve_errors_total", "rnnserve_active_streams"} <= used
    assert used <= exported, f"named by the dashboard but not exported: {sorted(used - exported)}"


def test_as_promql_substitutes_grafana_syntax() -> None:
    assert as_promql('rate(x{job=~"$job"}[$__rate_interval])') == 'rate(x{job=~".*"}[1m])'
    assert as_promql('label_values(m{job=~"$job"}, model)') == 'group by (model) (m{job=~".*"})'


def test_provisioning_points_at_the_dashboard_and_a_prometheus() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "rnnserve.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    # The dashboard's data source variable offers every Prometheus, this one included.
    (variable,) = (v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["type"] == "datasource" and variable["query"] == source["type"]
