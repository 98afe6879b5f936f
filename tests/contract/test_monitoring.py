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
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
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


def test_the_rag_row_charts_every_rag_series_but_the_plain_counts():
    """Dropped documents, context tokens, citation validity and declines, per model and template."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    [start] = [
        i for i, p in enumerate(panels) if p["type"] == "row" and p["title"].startswith("RAG")
    ]
    below = []  # the row's panels: those after it, up to the next row
    for panel in panels[start + 1 :]:
        if panel["type"] == "row":
            break
        below.append(panel)
    rag = {
        _family(name)
        for panel in below
        for target in panel["targets"]
        for name in METRIC.findall(target["expr"])
    }
    assert rag == {
        "ragllm_rag_documents_dropped",
        "ragllm_rag_documents_received",
        "ragllm_rag_context_tokens",
        "ragllm_rag_citations_valid",
        "ragllm_rag_citations_unknown",
        "ragllm_rag_citations_missing",
        "ragllm_rag_answers_declined",
        "ragllm_rag_answers",
    }
    expressions = [t["expr"] for panel in below for t in panel["targets"]]
    assert all("by (" in e and "template" in e and "model_name" in e for e in expressions)


def test_prometheus_config_scrapes_the_service():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["rag-llm-service"]["static_configs"][0]["targets"] == ["rag-llm-service:8081"]
