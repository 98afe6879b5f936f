"""Every stream ends with a finish or an error event, then ``data: [DONE]``, byte for byte, and what
the request log, the metrics and the status record is what the client saw.

Kinds: fresh, cache replay, RAG, text completion (the shared server); upstream, and upstream errors
of every shape a broken upstream can send (a gateway in front of ``MisbehavingUpstream``).
"""

from __future__ import annotations

import os
import time

import httpx
import pytest
import redis

from tests.misbehaving_upstream import BEHAVIOURS, GOOD_TEXT, MisbehavingUpstream
from tests.servers import MODEL, ServerProcess, metric_value
from tests.sse import DONE, post_stream

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
UPSTREAM_ERRORS = sorted(set(BEHAVIOURS) - {"good"})


def _chat(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, "stream": True, **extra}


def _assert_ends_properly(result) -> None:
    assert result.status == 200
    assert result.raw.endswith(DONE) and result.raw.count(DONE) == 1
    last_event = result.events[-1]
    assert "error" in last_event or any(c.get("finish_reason") for c in last_event.get("choices") or ()) \
        or last_event.get("usage"), last_event


def test_fresh_cached_rag_and_completion_streams_end_with_done(server):
    fresh = post_stream(server.url, _chat("Name a colour."))
    replay = post_stream(server.url, _chat("Name a colour."))  # deterministic: the cache answers
    assert replay.text == fresh.text
    rag = post_stream(server.url, _chat("What colour is the door?", documents=[
        {"id": "door", "text": "The front door is painted green."}]), NO_CACHE)
    completion = post_stream(server.url, {"model": MODEL, "prompt": "Once upon", "max_tokens": 4,
                                          "stream": True, "stream_options": {"include_usage": True}},
                             NO_CACHE, path="/v1/completions")
    for result in (fresh, replay, rag, completion):
        _assert_ends_properly(result)
    assert rag.finish_reason in ("stop", "length") and "rag" in rag.events[-1]


def test_the_end_of_sequence_token_releases_held_back_text(server):
    """Text held back as a possible stop-string start is part of the answer when the answer ends."""
    plain = httpx.post(f"{server.url}/v1/chat/completions", headers=NO_CACHE, timeout=60, json={
        **_chat("Say hello.", stream=False), "max_tokens": 64}).json()["choices"][0]
    assert plain["finish_reason"] == "stop"  # it ends on its own end-of-sequence token
    answer = plain["message"]["content"]
    # A stop string that is never completed but whose start is the answer's last character.
    stop = answer[-1] + "\x00never"
    held = post_stream(server.url, {**_chat("Say hello.", stop=[stop]), "max_tokens": 64}, NO_CACHE)
    assert held.text == answer and held.finish_reason == "stop"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, shared_redis_url):
    upstream = MisbehavingUpstream().start()
    prefix = f"ragllm-streams-{os.urandom(4).hex()}"
    server = ServerProcess("--engine", "upstream", log_dir=tmp_path_factory.mktemp("gateway"), env={
        "RAGLLM_UPSTREAM__URLS": upstream.url, "REDIS_URL": shared_redis_url, "RAGLLM_REDIS__PREFIX": prefix})
    try:
        server.wait_ready()
        server.prefix = prefix
        yield server
    finally:
        server.stop()
        upstream.stop()


def _logged(redis_url: str, prefix: str) -> list[dict]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return [fields for _, fields in client.xrange(f"{prefix}:requests")]


def test_an_upstream_stream_relayed_whole_ends_with_done(gateway):
    good = post_stream(gateway.url, _chat("good"), NO_CACHE)
    _assert_ends_properly(good)
    assert good.text == "".join(GOOD_TEXT) and good.finish_reason == "stop"


@pytest.mark.parametrize("behaviour", UPSTREAM_ERRORS)
def test_a_started_stream_whose_upstream_misbehaves_ends_with_an_error_event(gateway, behaviour, shared_redis_url):
    result = post_stream(gateway.url, _chat(behaviour), NO_CACHE)
    _assert_ends_properly(result)
    assert result.error is not None and result.error["type"] == "server_error", result.raw
    assert result.finish_reason is None  # never a finish for an answer that did not finish
    entry = _entry(shared_redis_url, gateway.prefix, result.headers["x-request-id"])
    assert entry["status"] == "500" and entry["finish_reason"] == "error"


def _entry(redis_url: str, prefix: str, request_id: str) -> dict:
    """The request log's entry for one request (written within ~0.1 s of its end)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for entry in _logged(redis_url, prefix):
            if entry["request_id"] == request_id:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no request-log entry for {request_id}")


def test_a_whole_answer_that_is_not_json_is_a_clear_error(gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers=NO_CACHE, timeout=60,
                          json=_chat("garbage", stream=False))
    assert response.status_code == 500
    assert "malformed JSON" in response.json()["error"]["message"]


def test_errors_in_started_streams_are_counted_as_errors(gateway):
    metrics = httpx.get(f"{gateway.url}/metrics").text
    failed = metric_value(metrics, 'ragllm_requests_total{endpoint="/v1/chat/completions",status="500"}')
    assert failed >= len(UPSTREAM_ERRORS)
