"""Cache, API keys, global rate limits and the request log, against real servers and a real Redis."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest
import redis

from tests.support.servers import MODEL, ServerProcess, wait_clear_of_window_edge

KEYS = "team-a:secret-a,team-b:secret-b"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _start(tmp_path_factory, redis_url: str, prefix: str, **extra_env: str) -> ServerProcess:
    env = {
        "REDIS_URL": redis_url,
        "RAGLLM_REDIS__PREFIX": prefix,
        "RAGLLM_AUTH__KEYS": KEYS,
        **extra_env,
    }
    return ServerProcess(env=env, log_dir=tmp_path_factory.mktemp("redis-server"))


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def limited_pair(tmp_path_factory, shared_redis_url, prefix):
    """Two server processes sharing one Redis, with 4 requests per minute per key."""
    servers = [
        _start(tmp_path_factory, shared_redis_url, prefix, RAGLLM_LIMITS__RPM="4") for _ in range(2)
    ]
    try:
        yield [server.wait_ready() for server in servers]
    finally:
        for server in servers:
            server.stop()


def _client(server: ServerProcess, key: str = "secret-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _log_entries(redis_url: str, prefix: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return [fields for _, fields in client.xrange(f"{prefix}:requests")]


def _wait_for_entries(
    redis_url: str, prefix: str, count: int, timeout_s: float = 10
) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout_s
    entries = _log_entries(redis_url, prefix)
    while len(entries) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        entries = _log_entries(redis_url, prefix)
    return entries


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory, shared_redis_url):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    server = _start(tmp_path_factory, shared_redis_url, prefix, RAGLLM_CACHE__TTL_S="2")
    try:
        server.wait_ready().prefix = prefix
        yield server
    finally:
        server.stop()


def _chat(client: openai.OpenAI, headers: dict | None = None, **overrides):
    arguments = {
        "model": MODEL,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 12,
        **overrides,
    }
    return client.chat.completions.with_raw_response.create(
        extra_headers=headers or {}, **arguments
    )


def test_cache_miss_then_hit_through_the_sdk(cache_server):
    client = _client(cache_server)
    first = _chat(client, max_tokens=13)
    second = _chat(client, max_tokens=13)
    assert first.headers["x-ragllm-cache"] == "miss"
    assert second.headers["x-ragllm-cache"] == "hit"
    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage == a.usage
    assert b.choices[0].finish_reason == a.choices[0].finish_reason
    assert b.id != a.id


def test_a_hit_replays_as_a_proper_stream(cache_server):
    client = _client(cache_server)
    original = _chat(client, max_tokens=14).parse()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=14,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-ragllm-cache"] == "hit"
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == original.choices[0].message.content
    assert chunks[-1].usage == original.usage


def test_sampled_requests_bypass_and_cache_control_is_honoured(cache_server):
    client = _client(cache_server)
    assert _chat(client, temperature=0.8).headers["x-ragllm-cache"] == "bypass"
    assert _chat(client, temperature=0.8, seed=5).headers["x-ragllm-cache"] == "miss"
    assert (
        _chat(client, {"Cache-Control": "no-store"}, max_tokens=15).headers["x-ragllm-cache"]
        == "miss"
    )
    assert (
        _chat(client, max_tokens=15).headers["x-ragllm-cache"] == "miss"
    )  # no-store wrote nothing
    assert _chat(client, max_tokens=15).headers["x-ragllm-cache"] == "hit"
    assert (
        _chat(client, {"Cache-Control": "no-cache"}, max_tokens=15).headers["x-ragllm-cache"]
        == "miss"
    )


def test_tenants_never_share_entries(cache_server):
    _chat(_client(cache_server, "secret-a"), max_tokens=16)
    assert (
        _chat(_client(cache_server, "secret-a"), max_tokens=16).headers["x-ragllm-cache"] == "hit"
    )
    assert (
        _chat(_client(cache_server, "secret-b"), max_tokens=16).headers["x-ragllm-cache"] == "miss"
    )


def test_entries_expire_after_their_ttl(cache_server):
    client = _client(cache_server)
    _chat(client, max_tokens=17)
    assert _chat(client, max_tokens=17).headers["x-ragllm-cache"] == "hit"
    time.sleep(2.5)
    assert _chat(client, max_tokens=17).headers["x-ragllm-cache"] == "miss"


def test_missing_or_wrong_key_is_401(cache_server):
    with pytest.raises(openai.AuthenticationError):
        _client(cache_server, "wrong").chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=2
        )
    response = httpx.post(
        f"{cache_server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 2},
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{cache_server.url}/v1/models").status_code == 401


def test_rate_limit_holds_across_two_processes(limited_pair, shared_redis_url, prefix):
    first, second = limited_pair
    wait_clear_of_window_edge()
    headers = []
    for server in (first, second, first, second):  # 4 allowed per minute in all, wherever they land
        raw = _chat(_client(server), {"Cache-Control": "no-cache"}, max_tokens=2)
        headers.append(raw.headers)
    assert [h["x-ratelimit-remaining-requests"] for h in headers] == ["3", "2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as caught:
        _client(second).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    response = caught.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-limit-requests"] == "4"
    assert caught.value.code == "rate_limit_exceeded"
    # Another key has its own budget.
    assert _chat(_client(first, "secret-b"), max_tokens=2).parse().choices


def test_request_log_has_one_entry_per_request_including_errors(cache_server):
    prefix = cache_server.prefix
    before = len(_log_entries("redis://127.0.0.1:6379/0", prefix))
    client = _client(cache_server)
    ok = _chat(client, max_tokens=18)
    hit = _chat(client, max_tokens=18)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        _client(cache_server, "wrong").chat.completions.create(model=MODEL, messages=QUESTION)
    entries = _wait_for_entries("redis://127.0.0.1:6379/0", prefix, before + 5)[before:]
    assert len(entries) == 5
    assert [e["status"] for e in entries] == ["200", "200", "404", "400", "401"]
    assert entries[0]["request_id"] == ok.headers["x-request-id"]
    assert entries[1]["request_id"] == hit.headers["x-request-id"]
    assert [e["cache"] for e in entries[:2]] == ["miss", "hit"]
    assert entries[0]["key_id"] == "team-a"
    assert int(entries[0]["completion_tokens"]) == ok.parse().usage.completion_tokens
    assert float(entries[0]["ttft_ms"]) > 0 and float(entries[0]["latency_ms"]) >= float(
        entries[0]["ttft_ms"]
    )
    assert all("secret" not in value for entry in entries for value in entry.values())
