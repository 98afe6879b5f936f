"""Spans reach a real OTLP/HTTP endpoint started by the test, with the caller's trace id."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.otlp_collector import OtlpCollector
from tests.support.servers import MODEL, ServerProcess

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def collector():
    endpoint = OtlpCollector()
    yield endpoint
    endpoint.close()


def test_request_span_tree_continues_the_callers_trace(collector, tmp_path):
    server = ServerProcess(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "RAGLLM_SERVER__LOG_FORMAT": "json",
        },
        log_dir=tmp_path,
    )
    try:
        server.wait_ready()
        traceparent = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=60,
            headers={"traceparent": traceparent},
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert response.status_code == 200
        assert response.headers["x-trace-id"] == CALLER_TRACE_ID
        deadline = time.monotonic() + 10
        while len({s.name for s in collector.spans}) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        spans = {span.name: span for span in collector.spans}
        root = spans["POST /v1/chat/completions"]
        assert root.trace_id.hex() == CALLER_TRACE_ID
        assert root.parent_span_id.hex() == CALLER_SPAN_ID
        for child in ("auth", "rate_limit", "cache_lookup", "queue", "prefill", "decode"):
            assert spans[child].trace_id == root.trace_id
            assert spans[child].parent_span_id == root.span_id, child
            assert root.start_time_unix_nano <= spans[child].start_time_unix_nano
            assert spans[child].end_time_unix_nano <= root.end_time_unix_nano
        assert spans["queue"].end_time_unix_nano <= spans["prefill"].start_time_unix_nano + 1
        assert spans["prefill"].end_time_unix_nano <= spans["decode"].start_time_unix_nano + 1
        attributes = {a.key: a.value for a in root.attributes}
        assert attributes["http.response.status_code"].int_value == 200
        assert (
            attributes["gen_ai.usage.output_tokens"].int_value
            == response.json()["usage"]["completion_tokens"]
        )
        lines = [
            json.loads(raw)
            for raw in server.log_tail_full().splitlines()
            if '"ragllm.requests"' in raw
        ]
        assert lines[-1]["trace_id"] == CALLER_TRACE_ID
    finally:
        server.stop()


def test_a_request_without_traceparent_starts_a_new_trace(collector, tmp_path):
    server = ServerProcess(
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"},
        log_dir=tmp_path,
    )
    try:
        server.wait_ready()
        response = httpx.post(
            f"{server.url}/v1/completions",
            timeout=60,
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 2},
        )
        trace_id = response.headers["x-trace-id"]
        assert len(trace_id) == 32 and trace_id != CALLER_TRACE_ID
        deadline = time.monotonic() + 10
        roots: list = []
        while not roots and time.monotonic() < deadline:
            time.sleep(0.05)
            roots = [s for s in collector.spans if s.name == "POST /v1/completions"]
        [root] = roots
        assert root.trace_id.hex() == trace_id and not root.parent_span_id
    finally:
        server.stop()
