"""Several gateways (``ragllm serve --engine upstream``) in front of the same replicas, sharing one
Redis, as the cloud deployment runs them: one rate limit across all gateways and one request log.
The replicas are models of a vLLM replica (``bench/replica_server.py``); the gateways are real."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import openai
import pytest
import redis

from tests.support.servers import ServerProcess, free_port, wait_clear_of_window_edge

KEYS = "team-a:secret-a,team-b:secret-b"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def replica_urls():
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [sys.executable, "bench/replica_server.py", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for port in ports
    ]
    try:
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, replica_urls, shared_redis_url):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    env = {
        "RAGLLM_UPSTREAM__URLS": ",".join(replica_urls),
        "REDIS_URL": shared_redis_url,
        "RAGLLM_REDIS__PREFIX": prefix,
        "RAGLLM_AUTH__KEYS": KEYS,
        "RAGLLM_LIMITS__RPM": "4",
        "RAGLLM_CACHE__ENABLED": "false",
        "RAGLLM_UPSTREAM__PROBE_INTERVAL_S": "0.3",
    }
    servers = [
        ServerProcess("--engine", "upstream", env=env, log_dir=tmp_path_factory.mktemp("gateway"))
        for _ in range(2)
    ]
    try:
        for server in servers:
            server.wait_ready()
            server.prefix = prefix
        yield servers
    finally:
        for server in servers:
            server.stop()


def _client(server: ServerProcess, key: str = "secret-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def _log(redis_url: str, prefix: str, count: int, timeout_s: float = 10) -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    while True:
        entries = [fields for _, fields in client.xrange(f"{prefix}:requests")]
        if len(entries) >= count or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def test_two_gateways_keep_one_rate_limit_and_one_request_log(gateways, shared_redis_url):
    first, second = gateways
    wait_clear_of_window_edge()
    remaining, request_ids = [], []
    for server in (first, second, first, second):  # 4 allowed per minute in all, whichever gateway
        raw = _client(server).chat.completions.with_raw_response.create(
            model="replica-model", messages=MESSAGES, max_tokens=3
        )
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        request_ids.append(raw.headers["x-request-id"])
        assert raw.parse().choices[0].message.content
    assert remaining == ["3", "2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as caught:
        _client(first).chat.completions.create(
            model="replica-model", messages=MESSAGES, max_tokens=3
        )
    assert caught.value.code == "rate_limit_exceeded"
    assert (
        _client(second, "secret-b")
        .chat.completions.create(model="replica-model", messages=MESSAGES, max_tokens=3)
        .choices
    )  # its own budget
    entries = _log(shared_redis_url, first.prefix, 6)
    assert len(entries) == 6  # both gateways' requests, refused one included, in one stream
    # (each gateway appends its entry as its answer ends, so two gateways' entries may interleave)
    by_id = {entry["request_id"]: entry for entry in entries}
    assert set(request_ids) <= set(by_id) and all(by_id[i]["status"] == "200" for i in request_ids)
    assert sorted(e["status"] for e in entries) == ["200"] * 5 + ["429"]
    assert sorted(e["key_id"] for e in entries) == ["team-a"] * 5 + ["team-b"]
