"""The shipped dashboard parses, and every metric it queries is exported on /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
METRIC = re.compile(r"\b((?:vllm:|ragllm_)[a-zA-Z0-9_:]+)")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _queried_metrics() -> set[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for expression in expressions for name in METRIC.findall(expression)}


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_dashboard_metric_is_exported(server):
    queried = _queried_metrics()
    assert len(queried) >= 12
    exposition = httpx.get(f"{server.url}/metrics").text
    families = {
        _family(line.split()[2]) for line in exposition.splitlines() if line.startswith("# TYPE ")
    }
    missing = sorted(name for name in queried if _family(name) not in families)
    assert not missing, f"queried by the dashboard but not exported: {missing}"


def test_prometheus_config_scrapes_the_service():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["rag-llm-service"]["static_configs"][0]["targets"] == ["rag-llm-service:8081"]
