"""Request log lines: JSON in the cloud format, one per request; prompts only when enabled."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.servers import MODEL, ServerProcess

SECRET_QUESTION = "What is the capital of Zubrowka, the secret word?"


def _request_lines(server: ServerProcess, request_id: str) -> list[dict]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = []
        for raw in server.log_tail_full().splitlines():
            if raw.startswith("{"):
                line = json.loads(raw)
                if line.get("request_id") == request_id:
                    lines.append(line)
        if lines:
            return lines
        time.sleep(0.1)
    return []


@pytest.mark.parametrize("log_prompts", [False, True])
def test_json_request_lines(tmp_path, log_prompts):
    server = ServerProcess(
        env={
            "RAGLLM_SERVER__LOG_FORMAT": "json",
            "RAGLLM_SERVER__LOG_PROMPTS": str(log_prompts).lower(),
        },
        log_dir=tmp_path,
    )
    try:
        server.wait_ready()
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=60,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": SECRET_QUESTION}],
                "max_tokens": 5,
            },
        )
        assert response.status_code == 200
        [line] = _request_lines(server, response.headers["x-request-id"])
        assert (
            line["status"] == 200
            and line["level"] == "info"
            and line["logger"] == "ragllm.requests"
        )
        assert line["completion_tokens"] == response.json()["usage"]["completion_tokens"]
        assert line["latency_ms"] >= line["ttft_ms"] > 0
        logged_prompt = "Zubrowka" in server.log_tail_full()
        assert logged_prompt is log_prompts
        if log_prompts:
            assert line["completion"] == response.json()["choices"][0]["message"]["content"]
        # Every line the server wrote is JSON, uvicorn's own included.
        assert all(
            raw.startswith("{") for raw in server.log_tail_full().splitlines() if raw.strip()
        )
    finally:
        server.stop()
