"""Every stream ends with a finish or an error event, then ``data: [DONE]``, byte for byte, and what
the request log, the metrics and the status record is what the client saw.

Kinds: fresh, cache replay, RAG, text completion (the shared server); upstream, and upstream errors
of every shape a broken upstream can send (a gateway in front of ``MisbehavingUpstream``).
"""

from __future__ import annotations

import json
import os
import time

import httpx
import openai
import orjson
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.misbehaving_upstream import (
    BEHAVIOURS,
    GOOD_TEXT,
    REFUSAL_MESSAGE,
    REFUSALS,
    REFUSE_WITH,
    STREAM_ERROR_MESSAGE,
    MisbehavingUpstream,
)
from tests.support.servers import MODEL, ServerProcess, metric_value
from tests.support.sse import DONE, post_stream

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
UPSTREAM_ERRORS = sorted(set(BEHAVIOURS) - {"good"})


def _chat(content: str, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        **extra,
    }


def _assert_ends_properly(result) -> None:
    assert result.status == 200
    assert result.raw.endswith(DONE) and result.raw.count(DONE) == 1
    last_event = result.events[-1]
    assert (
        "error" in last_event
        or any(c.get("finish_reason") for c in last_event.get("choices") or ())
        or last_event.get("usage")
    ), last_event


def test_fresh_cached_rag_and_completion_streams_end_with_done(server):
    fresh = post_stream(server.url, _chat("Name a colour."))
    replay = post_stream(server.url, _chat("Name a colour."))  # deterministic: the cache answers
    assert replay.text == fresh.text
    rag = post_stream(
        server.url,
        _chat(
            "What colour is the door?",
            documents=[{"id": "door", "text": "The front door is painted green."}],
        ),
        NO_CACHE,
    )
    completion = post_stream(
        server.url,
        {
            "model": MODEL,
            "prompt": "Once upon",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        NO_CACHE,
        path="/v1/completions",
    )
    for result in (fresh, replay, rag, completion):
        _assert_ends_properly(result)
    assert rag.finish_reason in ("stop", "length") and "rag" in rag.events[-1]


def test_the_end_of_sequence_token_releases_held_back_text(server):
    """Text held back as a possible stop-string start is part of the answer when the answer ends."""
    plain = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=NO_CACHE,
        timeout=60,
        json={**_chat("Say hello.", stream=False), "max_tokens": 64},
    ).json()["choices"][0]
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
    server = ServerProcess(
        "--engine",
        "upstream",
        log_dir=tmp_path_factory.mktemp("gateway"),
        env={
            "RAGLLM_UPSTREAM__URLS": upstream.url,
            "REDIS_URL": shared_redis_url,
            "RAGLLM_REDIS__PREFIX": prefix,
        },
    )
    try:
        server.wait_ready()
        server.prefix, server.upstream = prefix, upstream
        yield server
    finally:
        server.stop()
        upstream.stop()


@pytest.fixture(scope="module")
def one_json_gateway(tmp_path_factory):
    """A gateway that asks for whole answers as one JSON each (``stream_whole_answers`` off)."""
    upstream = MisbehavingUpstream().start()
    server = ServerProcess(
        "--engine",
        "upstream",
        log_dir=tmp_path_factory.mktemp("one-json-gateway"),
        env={
            "RAGLLM_UPSTREAM__URLS": upstream.url,
            "RAGLLM_UPSTREAM__STREAM_WHOLE_ANSWERS": "false",
        },
    )
    try:
        server.wait_ready()
        server.upstream = upstream
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
def test_a_started_stream_whose_upstream_misbehaves_ends_with_an_error_event(
    gateway, behaviour, shared_redis_url
):
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


@pytest.mark.parametrize("asked_as", ["a stream", "one JSON"])
def test_a_whole_answer_that_is_not_json_is_a_clear_error(gateway, one_json_gateway, asked_as):
    server = gateway if asked_as == "a stream" else one_json_gateway
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=NO_CACHE,
        timeout=60,
        json=_chat("garbage", stream=False),
    )
    assert response.status_code == 500
    assert "malformed JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("asked_as", ["a stream", "one JSON"])
def test_a_whole_answer_is_relayed_with_the_upstreams_usage_either_way(
    gateway, one_json_gateway, asked_as
):
    server = gateway if asked_as == "a stream" else one_json_gateway
    answer = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=NO_CACHE,
        timeout=60,
        json=_chat("good", stream=False),
    ).json()
    assert answer["choices"][0]["message"]["content"] == "".join(GOOD_TEXT)
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (7, 4)
    assert server.upstream.received[-1]["stream"] is (asked_as == "a stream")


def test_errors_in_started_streams_are_counted_as_errors(gateway):
    metrics = httpx.get(f"{gateway.url}/metrics").text
    failed = metric_value(
        metrics, 'ragllm_requests_total{endpoint="/v1/chat/completions",status="500"}'
    )
    assert failed >= len(UPSTREAM_ERRORS)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("behaviour", sorted(REFUSALS))
def test_an_upstream_refusal_with_an_integer_code_reaches_the_sdk_in_openais_envelope(
    gateway, behaviour, stream
):
    """vLLM's envelope (``code: 400``, nested or flat): the SDK gets a string code, and the message."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": behaviour}],
            max_tokens=8,
            stream=stream,
            extra_headers=NO_CACHE,
        )
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "400" and caught.value.code == "400"
    assert (
        error["message"] == REFUSAL_MESSAGE
        and error["type"] == "BadRequestError"
        and error["param"] is None
    )


@pytest.mark.parametrize("behaviour", ["flat-error-then-more", "nested-error-then-more"])
def test_an_upstream_error_inside_a_stream_ends_it_whatever_follows(gateway, behaviour):
    """The upstream sends an error, then more text and a finish: the client gets the error, with the
    upstream's message and a string code, and never the finish of an answer that failed."""
    result = post_stream(gateway.url, _chat(behaviour), NO_CACHE)
    _assert_ends_properly(result)
    assert result.error is not None and result.error["code"] == "engine_error", result.raw
    assert STREAM_ERROR_MESSAGE in result.error["message"]
    assert result.text == "The " and result.finish_reason is None


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)
ERROR_FIELDS = st.dictionaries(
    st.sampled_from(["message", "type", "param", "code", "object"]), JSON_VALUES, max_size=5
)
# Written with the standard library's json, which writes integers of any size (orjson stops at 64 bits).
REFUSAL_BODIES = (
    ERROR_FIELDS.map(lambda fields: json.dumps({"error": fields}))
    | ERROR_FIELDS.map(json.dumps)
    | JSON_VALUES.map(json.dumps)
    | st.text(max_size=200)
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=REFUSAL_BODIES, stream=st.booleans())
@example(body="[" * 20_000 + "]" * 20_000, stream=False)  # nested past any JSON parser's depth
@example(
    body=orjson.dumps({"error": {"message": "x" * 2_000_000, "code": 400}}).decode(), stream=True
)
@example(
    body='{"error": {"message": 42, "type": 7, "param": [1], "code": {"deep": [400]}}}',
    stream=False,
)
@example(body="<html>400 from a proxy in the way</html>", stream=False)
def test_whatever_an_upstream_refuses_with_reaches_the_client_as_openais_envelope(
    gateway, body, stream
):
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers=NO_CACHE,
        timeout=60,
        json=_chat(REFUSE_WITH + body, stream=stream),
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and len(error["message"]) <= 2000
    assert isinstance(error["type"], str) and error["type"]
    for name in ("param", "code"):
        assert error[name] is None or isinstance(error[name], str), error
