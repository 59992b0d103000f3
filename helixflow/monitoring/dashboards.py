"""A Prometheus scrape configuration for the monitored services and a Grafana dashboard of
their metrics (served as ``/prometheus.yml`` and ``/grafana.json``).

`PANELS` is the dashboard's content: each panel names the PromQL it plots. A test checks that
every metric a panel names is exported by the real services.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from helixflow.monitoring.targets import Target

__all__ = ["PANELS", "grafana_dashboard", "metric_names", "prometheus_config"]

# (title, unit, [(legend, PromQL)])
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests by route and status", "reqps", [
        ("{{route}} {{status}}",
         "sum by (route, status) (rate(helixflow_gateway_requests_total[1m]))")]),
    ("Request latency (gateway)", "s", [
        ("p50 {{route}}", "histogram_quantile(0.5, sum by (le, route) "
                          "(rate(helixflow_gateway_request_seconds_bucket[5m])))"),
        ("p95 {{route}}", "histogram_quantile(0.95, sum by (le, route) "
                          "(rate(helixflow_gateway_request_seconds_bucket[5m])))")]),
    ("Time to first token", "s", [
        ("pool p50 {{model}}", "histogram_quantile(0.5, sum by (le, model) "
                               "(rate(helixflow_pool_time_to_first_token_seconds_bucket[5m])))"),
        ("pool p95 {{model}}", "histogram_quantile(0.95, sum by (le, model) "
                               "(rate(helixflow_pool_time_to_first_token_seconds_bucket[5m])))"),
        ("gateway p95 {{model}}", "histogram_quantile(0.95, sum by (le, model) (rate("
                                  "helixflow_gateway_time_to_first_token_seconds_bucket[5m])))")]),
    ("Inter-token latency", "s", [
        ("p50 {{model}}", "histogram_quantile(0.5, sum by (le, model) "
                          "(rate(helixflow_pool_inter_token_seconds_bucket[5m])))"),
        ("p95 {{model}}", "histogram_quantile(0.95, sum by (le, model) "
                          "(rate(helixflow_pool_inter_token_seconds_bucket[5m])))")]),
    ("Tokens per second", "short", [
        ("prompt {{model}}", "sum by (model) (rate(helixflow_pool_prompt_tokens_total[1m]))"),
        ("generated {{model}}",
         "sum by (model) (rate(helixflow_pool_generation_tokens_total[1m]))")]),
    ("Requests running and waiting", "short", [
        ("running {{model}}", "sum by (model) (helixflow_pool_requests_running)"),
        ("waiting {{model}}", "sum by (model) (helixflow_pool_requests_waiting)")]),
    ("KV-cache usage", "percentunit", [
        ("{{model}}", "max by (model) (helixflow_pool_kv_cache_usage)")]),
    ("Prefix-cache hit rate", "percentunit", [
        ("{{model}}", "avg by (model) (helixflow_pool_prefix_cache_hit_rate)")]),
    ("Preemptions", "short", [
        ("{{model}}", "sum by (model) (rate(helixflow_pool_preemptions_total[5m]))")]),
    ("Rate-limited requests", "reqps", [
        ("{{limit}}", "sum by (limit) (rate(helixflow_gateway_rate_limited_total[1m]))")]),
    ("Authentication failures by reason", "reqps", [
        ("gateway {{reason}}",
         "sum by (reason) (rate(helixflow_gateway_auth_failures_total[1m]))"),
        ("auth {{operation}} {{reason}}",
         "sum by (operation, reason) (rate(helixflow_auth_failures_total[1m]))")]),
    ("Backend and service health", "short", [
        ("backend {{backend}}", "min by (backend) (helixflow_gateway_backend_healthy)"),
        ("service {{service}}", "min by (service) (helixflow_monitor_service_up)")]),
]  # fmt: skip

_PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "max", "min", "avg", "le"}


def metric_names() -> set[str]:
    """Every metric the dashboard plots, as exported (``_total``/``_bucket`` included)."""
    names: set[str] = set()
    for _, _, queries in PANELS:
        for _, expr in queries:
            names.update(w for w in re.findall(r"helixflow_[a-z_]+", expr))
    return names - _PROMQL_WORDS


def grafana_dashboard(datasource: str = "${DS_PROMETHEUS}") -> dict[str, Any]:
    """A Grafana dashboard (schema 39) with one time-series panel per entry of `PANELS`."""
    panels = []
    for index, (title, unit, queries) in enumerate(PANELS):
        panels.append({
            "id": index + 1,
            "type": "timeseries",
            "title": title,
            "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
            "datasource": {"type": "prometheus", "uid": datasource},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": datasource}}
                        for i, (legend, expr) in enumerate(queries)],
        })  # fmt: skip
    return {
        "title": "HelixFlow",
        "uid": "helixflow-overview",
        "tags": ["helixflow"],
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "panels": panels,
    }  # fmt: skip


def prometheus_config(targets: tuple[Target, ...], *, monitor: str | None = None,
                      ca_file: str | None = None, interval_s: int = 15) -> str:  # fmt: skip
    """A ``prometheus.yml`` scraping each target's metrics (and the monitor's own)."""
    jobs = [(t.name, t.metrics) for t in targets if t.metrics]
    if monitor:
        jobs.append(("monitor", monitor))
    lines = ["# Prometheus scrape configuration for HelixFlow (made by helixflow monitor)",
             "global:", f"  scrape_interval: {interval_s}s", "scrape_configs:"]  # fmt: skip
    for name, url in jobs:
        parts = urlsplit(url)
        lines += [f"  - job_name: helixflow-{name}",
                  f"    scheme: {parts.scheme}",
                  f"    metrics_path: {json.dumps(parts.path or '/metrics')}"]  # fmt: skip
        if parts.scheme == "https" and ca_file:
            lines += ["    tls_config:", f"      ca_file: {json.dumps(ca_file)}"]
        lines += ["    static_configs:", f"      - targets: [{json.dumps(parts.netloc)}]",
                  f"        labels: {{service: {name}}}"]  # fmt: skip
    return "\n".join(lines) + "\n"
