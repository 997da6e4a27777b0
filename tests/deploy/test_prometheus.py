"""The Prometheus files: promtool's checks and unit tests, a unit test for every alert, and a real Prometheus
scraping a real rnnserve that evaluates every alert and every dashboard query."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml

from bench.load import LoadSpec, run_load
from bench.process import ServerProcess, free_port
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.deploy.conftest import DEPLOY, ROOT, tool
from tests.deploy.test_grafana import as_promql, dashboard, panel_expressions, variable_queries

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
MODEL = "charlm-lstm"  # its newest version takes [T, 84] float32
# Panels with no series while every answer succeeds (rnnserve_errors_total has only the client codes).
EMPTY_WHEN_HEALTHY = {"Server error ratio / A"}
# Alerts whose expressions a slow machine under this load may meet; the others must find nothing.
SPEED_DEPENDENT = {"RnnServeStepLatencyHigh", "RnnServeQueueWaitHigh"}

T = TypeVar("T")


def promtool(*args: str | Path) -> None:
    done = subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{done.stdout}\n{done.stderr}"


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    promtool("check", "rules", ALERTS)


def test_promtool_checks_the_scrape_configuration() -> None:
    promtool("check", "config", PROMETHEUS / "prometheus.yml")


def test_promtool_checks_the_kubernetes_configuration_but_its_discovery(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes discovery: promtool checks everything else (the
    relabelling included) with the discovery swapped for a static target."""
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "rnnserve" and job["metrics_path"] == "/metrics"
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_container_port_number",)] == "9090"
    assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "rnnserve"
    targets = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert {"instance", "pod", "namespace"} <= targets
    job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    config["rule_files"] = [str(ALERTS)]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    promtool("check", "config", checked)


def test_promtool_runs_the_alert_unit_tests() -> None:
    promtool("test", "rules", PROMETHEUS / "alerts_test.yml")


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
    for rule in rules():
        name = rule["alert"]
        assert True in cases.get(name, []), f"{name}: no unit test where it fires"
        assert False in cases.get(name, []), f"{name}: no unit test where it stays quiet"
    assert set(cases) == {rule["alert"] for rule in rules()}, "unit tests for alerts that do not exist"


def test_every_alert_says_how_bad_what_and_what_to_do() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    documented = (PROMETHEUS / "README.md").read_text()
    for rule in rules():
        name = rule["alert"]
        assert re.fullmatch(r"RnnServe[A-Z]\w+", name), name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for`"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert f"`{name}`" in documented, f"{name} is not described in deploy/prometheus/README.md"


# --- A real Prometheus on a real server ----------------------------------------------------------------


class PrometheusAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:  # a bad query: 400 with the error in the body
            body = json.load(err)
        return body

    def ready(self) -> bool:
        """Whether it answers queries (before that /-/ready answers 503)."""
        with urllib.request.urlopen(self.base.replace("/api/v1", "/-/ready"), timeout=5) as response:
            return bool(response.status == 200)

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("query", query=expr)
        assert body["status"] == "success", f"{expr}\n{body.get('errorType')}: {body.get('error')}"
        return list(body["data"]["result"])


def wait_for(condition: Callable[[], T | None], deadline: float, what: str) -> T:
    while True:
        try:
            found = condition()
        except OSError:  # not listening yet
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def refused_step(target: str) -> int:
    """Send seq 3 of a session that never started; return the code it is answered with."""
    step = pb.StepRequest(
        model=MODEL, session_id="never-started", seq=3, input=pb.Tensor(shape=[1, 84], raw=bytes(4 * 84))
    )
    with grpc.insecure_channel(target) as channel:
        (answer,) = pb_grpc.RnnServeStub(channel).Stream(iter([step]), timeout=10)
    return int(answer.error.code)


@pytest.fixture
def scraped_server(redis_store_url: str, tmp_path: Path) -> Iterator[tuple[PrometheusAPI, str, Path]]:
    """A one-worker rnnserve on the shipped models, and a Prometheus scraping it every second with
    prometheus.yml's job and alerts.yml; yields the API, the server's target and Prometheus's log."""
    port, metrics_port, web_port = free_port(), free_port(), free_port()
    server = ServerProcess.rnnserve(
        port,
        ROOT / "models",
        redis_store_url,
        "--workers",
        "1",
        metrics_port=metrics_port,
        log=tmp_path / "rnnserve.log",
    )
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job |= {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        server.start(timeout_s=30)
        with log.open("wb") as output:
            prometheus = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{web_port}",
                ],
                stdout=output,
                stderr=output,
            )
        api = PrometheusAPI(web_port)
        wait_for(api.ready, time.monotonic() + 15, "Prometheus to start")
        yield api, f"127.0.0.1:{port}", log
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        server.stop()


@pytest.mark.timeout(90)
def test_a_real_prometheus_evaluates_every_alert_and_dashboard_query(
    scraped_server: tuple[PrometheusAPI, str, Path],
) -> None:
    api, target, log = scraped_server
    deadline = time.monotonic() + 40
    try:
        # A step, and one for a session that never started (NOT_FOUND, a client's mistake, counted by code),
        # so that their series exist before the load: a rate needs two samples of a series.
        asyncio.run(run_load(LoadSpec(target, sessions=1, steps=1, model=MODEL)))
        assert refused_step(target) == grpc.StatusCode.NOT_FOUND.value[0]
        wait_for(lambda: api.query('rnnserve_errors_total{job="rnnserve",code="NOT_FOUND"}'), deadline, "a scrape")
        result = asyncio.run(run_load(LoadSpec(target, sessions=64, steps=5, streams=4, model=MODEL)))
        assert result.steps == 320 and not result.errors

        def p99() -> float | None:
            expr = "histogram_quantile(0.99, sum by (le) (rate(rnnserve_step_latency_seconds_bucket[1m])))"
            samples = api.query(expr)
            value = float(samples[0]["value"][1]) if samples else math.nan
            return value if math.isfinite(value) else None

        assert 0 < wait_for(p99, deadline, "the load in two scrapes") < 2.5

        for rule in rules():
            answer = api.query(rule["expr"])  # asserts that it evaluates
            if rule["alert"] not in SPEED_DEPENDENT:
                assert answer == [], f"{rule['alert']} would fire on a healthy server: {answer}"
        board = dashboard()
        for name, expr in panel_expressions(board).items():
            answer = api.query(as_promql(expr))
            assert bool(answer) != (name in EMPTY_WHEN_HEALTHY), f"{name}: {as_promql(expr)} -> {answer}"
        for name, expr in variable_queries(board).items():
            assert api.query(as_promql(expr)), f"variable {name}: {as_promql(expr)}"
        assert [s["metric"]["model"] for s in api.query(as_promql(variable_queries(board)["model"]))]

        def loaded() -> list[dict[str, Any]] | None:
            (group,) = api.get("rules")["data"]["groups"]
            evaluated = all(r["health"] == "ok" and r["lastEvaluation"][:4] != "0001" for r in group["rules"])
            return list(group["rules"]) if evaluated else None

        loaded_rules = wait_for(loaded, deadline, "every rule evaluated")
        assert [r["name"] for r in loaded_rules] == [r["alert"] for r in rules()]
    except AssertionError:
        print(log.read_text()[-4000:])  # Prometheus's own account, shown with the failure
        raise
