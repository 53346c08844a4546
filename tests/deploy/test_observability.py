"""The Grafana dashboard and the compose Prometheus/Grafana configuration name only what darkroom exports."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services import metrics
from tests.deploy import ROOT
from tests.deploy.promql import exported_series, problems, selectors

DASHBOARD = ROOT / "deploy" / "grafana" / "darkroom-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_every_panel_query_names_exported_series_and_labels(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    queries = expressions(dashboard)
    assert queries
    for title, expr in queries:
        assert problems(expr, exported) == [], f"panel {title!r}: {problems(expr, exported)}"


def test_template_variables_name_exported_series(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        for selector in selectors(query):
            assert selector.name in exported, f"variable {variable['name']}: {selector.name}"


def test_dashboard_covers_the_service(dashboard: dict[str, Any]) -> None:
    """The views the issue asks for: submissions, queue depth and wait, run and step time, outcomes,
    webhooks, HTTP rate and latency."""
    used = {selector.name for _, expr in expressions(dashboard) for selector in selectors(expr)}
    for required in (
        "darkroom_generation_submissions_total",
        "darkroom_queue_depth",
        "darkroom_generation_queue_wait_seconds_bucket",
        "darkroom_generation_run_seconds_bucket",
        "darkroom_generation_step_seconds_bucket",
        "darkroom_generation_jobs_total",
        "darkroom_webhook_attempts_total",
        "darkroom_http_requests_total",
        "darkroom_http_request_duration_seconds_bucket",
        "darkroom_generation_jobs_running",
        "darkroom_worker_ready",
    ):
        assert required in used, f"no panel shows {required}"
    all_exprs = " ".join(expr for _, expr in expressions(dashboard))
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert quantile in all_exprs


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource_vars = [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource_vars, "a datasource variable, so the dashboard imports into any Grafana"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${" + datasource_vars[0] + "}", panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_compose_prometheus_scrapes_every_process() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

    assert jobs["darkroom-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["darkroom-api"].get("metrics_path", "/metrics") == "/metrics"
    for job_name, service in (("darkroom-worker", "worker"), ("darkroom-webhooks", "webhooks")):
        (sd,) = jobs[job_name]["dns_sd_configs"]
        assert service in sd["names"] and sd["type"] == "A"
        assert str(sd["port"]) == compose[service]["environment"]["DARKROOM_WORKER_METRICS_PORT"]


def test_compose_grafana_provisioning_points_at_the_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "darkroom.yml").read_text())["providers"]
    mounts = dict(str(v).split(":")[:2] for v in compose["grafana"]["volumes"])
    target = mounts["./deploy/grafana/darkroom-dashboard.json"]
    assert target.rsplit("/", 1)[0] == provider["options"]["path"]


def test_every_metric_is_exported_by_a_scraped_process() -> None:
    """Each process exports only its role's families (services.metrics.export); a metric in no role would
    be defined, updated and never scraped, and a dashboard panel on it silently empty."""
    defined = {id(value) for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)}
    exported = {id(family) for families in metrics.ROLES.values() for family in families}
    assert defined == exported
