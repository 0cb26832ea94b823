"""The compose stack's Prometheus, alert rules and Grafana dashboard, wired to the app.

Every PromQL expression (dashboard, alerts, the prometheus-adapter rule) may name only
series that a live app exports, with label values it really uses.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from tests.deploy import promql
from tests.deploy.conftest import DOCKER, K8S, Series, load_yaml, tool

# Labels Prometheus attaches to every scraped series (compose: job, instance;
# Kubernetes through the ServiceMonitor and prometheus-adapter: namespace, pod, ...).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint_name"}
DASHBOARD = DOCKER / "grafana" / "dashboards" / "exitserve.json"
ADAPTER = K8S / "components" / "queue-time-autoscaling" / "prometheus-adapter-values.yaml"


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(DOCKER / "alerts.yml")["groups"]
    return [r for g in groups for r in g["rules"]]


def adapter_queries() -> list[str]:
    rules = load_yaml(ADAPTER)["rules"]["custom"]
    fill = {"<<.LabelMatchers>>": 'namespace="default",pod="p"', "<<.GroupBy>>": "pod"}
    out = []
    for r in rules:
        for q in (r["seriesQuery"], r["metricsQuery"]):
            for k, v in fill.items():
                q = q.replace(k, v)
            out.append(q)
    return out


def test_the_exported_series_are_the_ones_checked_against(exported: Series) -> None:
    # The check below is only as good as this scrape: counters, histograms and labels.
    assert "exitserve_requests_total" in exported
    assert {"exitserve_request_duration_seconds_bucket", "exitserve_exits_total"} <= set(exported)
    assert {s["endpoint"] for s in exported["exitserve_requests_total"]} >= {"predict", "v2_infer"}


@pytest.mark.parametrize(
    ("where", "expr"),
    # Grafana's model variable expands to a regex of the models chosen: any one served.
    [(f"dashboard: {t}", e.replace('"$model"', '".+"')) for t, e in dashboard_exprs()]
    + [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    + [("prometheus-adapter rule", q) for q in adapter_queries()],
)
def test_promql_selects_only_exported_series(where: str, expr: str, exported: Series) -> None:
    problems = promql.problems(expr, exported, TARGET_LABELS)
    assert not problems, f"{where}: {problems}"


def test_dashboard_shows_what_early_exit_saves_and_costs() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    quantiles = {
        q
        for _, e in dashboard_exprs()
        if "exitserve_request_duration_seconds_bucket" in e
        for q in ("0.5", "0.95", "0.99")
        if f"histogram_quantile({q}," in e
    }
    assert quantiles == {"0.5", "0.95", "0.99"}
    for metric in (
        "exitserve_requests_total",  # throughput
        "exitserve_exits_total",  # exit-depth distribution
        "exitserve_layers_skipped_total",  # share of layers skipped
        "exitserve_queue_size",
        "exitserve_batch_size_bucket",
        "exitserve_rejected_total",
    ):
        assert metric in exprs, metric


def test_dashboard_has_a_model_variable_that_every_exitserve_series_follows() -> None:
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "model"]
    assert "label_values(exitserve_model_info, model)" in json.dumps(var["query"])
    assert var["multi"] and var["includeAll"]
    for title, expr in dashboard_exprs():
        for sel in promql.parse(expr).selectors:
            if sel.metric.startswith("exitserve_"):
                assert ("model", "=~", "$model") in sel.matchers, (title, sel.metric)


def test_alert_rules_name_the_model_they_fire_for() -> None:
    for rule in alert_rules():
        groups = promql.parse(rule["expr"]).grouping
        if any(m.startswith("exitserve_") for m in promql.parse(rule["expr"]).metrics):
            assert not groups or "model" in groups, rule["alert"]
            assert "$labels.model" in rule["annotations"]["summary"], rule["alert"]


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    ds = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert var["query"] == ds[0]["type"] == "prometheus"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${" + var["name"] + "}", panel["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_compose_wires_prometheus_and_grafana_to_the_service() -> None:
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    app = services["exitserve"]
    assert (DOCKER / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == (
        DOCKER / "Dockerfile"
    )
    port = Settings.model_fields["port"].default
    assert f"{port}:{port}" in app["ports"]
    # Docker's SIGKILL must not cut the drain short.
    grace = int(app["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["drain_timeout_s"].default

    prom = load_yaml(DOCKER / "prometheus.yml")
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "exitserve"  # the job the alerts and adapter rule select
    assert job["static_configs"][0]["targets"] == [f"exitserve:{port}"]
    assert job["metrics_path"] == "/metrics"

    # Every file mounted into a container exists, and Grafana's dashboard provider reads
    # the folder the dashboards are mounted at.
    mounts = {}
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            assert (DOCKER / src).exists(), src
            mounts[dst] = DOCKER / src
    rule_files = [Path(job_dir) for job_dir in prom["rule_files"]]
    config_dir = Path(next(d for d, s in mounts.items() if s.name == "prometheus.yml")).parent
    for rf in rule_files:
        assert mounts[str(config_dir / rf)].resolve() == (DOCKER / rf).resolve()
    provider = load_yaml(DOCKER / "grafana/provisioning/dashboards/exitserve.yaml")
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path].resolve() == DASHBOARD.parent.resolve()


def test_prometheus_config_is_valid() -> None:
    out = subprocess.run(
        [tool("promtool"), "check", "config", str(DOCKER / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    out = subprocess.run(
        [tool("promtool"), "test", "rules", "alerts_test.yml"],
        cwd=DOCKER,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {a["alertname"] for t in load_yaml(DOCKER / "alerts_test.yml")["tests"]
              for a in t["alert_rule_test"]}  # fmt: skip
    assert tested == {r["alert"] for r in alert_rules()}
