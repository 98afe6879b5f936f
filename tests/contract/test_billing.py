"""What a request costs: the tokens its engine produced, charged against the key's tokens per minute,
written to the request log and counted in vLLM's token counters, however the request ends (a whole
answer, a cache hit, a client gone mid-stream, before a whole answer, or mid-upload).

One real server with API keys, a tpm limit and the machine's Redis; each test spends on its own key,
and reads the key's remaining tokens from ``/tokenize`` (admitted and limited, charged nothing).
"""

from __future__ import annotations

import json
import os
import socket
import time

import httpx
import pytest
import redis

from tests.support.servers import MODEL, ServerProcess, metric_value, wait_clear_of_window_edge

TPM = 1_000_000
LEAVE_AFTER = (1, 8)  # content chunks read before the client leaves a stream
UPLOADED = (0, 5_000)  # body bytes sent before the client leaves mid-upload (0: headers only)
KEYS = (
    "payer",
    "cached",
    "waiter",
    *(f"leaver-{n}" for n in LEAVE_AFTER),
    *(f"uploader-{n}" for n in UPLOADED),
)
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
QUESTION = [{"role": "user", "content": "Write a long essay about the sea."}]


@pytest.fixture(scope="module")
def billed(tmp_path_factory, shared_redis_url):
    prefix = f"ragllm-billing-{os.urandom(4).hex()}"
    server = ServerProcess(
        log_dir=tmp_path_factory.mktemp("billing"),
        env={
            "RAGLLM_AUTH__KEYS": ",".join(f"{key}:secret-{key}" for key in KEYS),
            "RAGLLM_LIMITS__TPM": str(TPM),
            "REDIS_URL": shared_redis_url,
            "RAGLLM_REDIS__PREFIX": prefix,
        },
    )
    try:
        server.wait_ready()
        server.prefix = prefix
        yield server
    finally:
        server.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer secret-{key}"}


def _remaining(server, key: str) -> int:
    response = httpx.post(
        f"{server.url}/tokenize",
        headers=_auth(key),
        timeout=30,
        json={"model": MODEL, "prompt": "x"},
    )
    assert response.status_code == 200, response.text
    return int(response.headers["x-ratelimit-remaining-tokens"])


def _remaining_once_settled(server, key: str, expected: int) -> int:
    """The key's remaining tokens once the last request's charge landed (it is spent as the request is
    recorded, just after its response), or what it is after 5 s."""
    deadline = time.monotonic() + 5
    remaining = _remaining(server, key)
    while remaining != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = _remaining(server, key)
    return remaining


def _entry(server, redis_url: str, request_id: str | None = None, key: str | None = None) -> dict:
    """The request log's entry for one request, by id or by key (written within ~0.1 s of its end)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for _, entry in client.xrange(f"{server.prefix}:requests"):
            if (request_id is None or entry["request_id"] == request_id) and (
                key is None or entry["key_id"] == key
            ):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no request-log entry for {request_id or key}")


def _tokens_counted(server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return metric_value(text, "vllm:prompt_tokens_total"), metric_value(
        text, "vllm:generation_tokens_total"
    )


def _engine_counted(server) -> tuple[float, float]:
    """The engine's own count of what it produced (prompts started, tokens sampled), not from billing."""
    text = httpx.get(f"{server.url}/metrics").text
    return metric_value(text, "ragllm_engine_prompt_tokens_total"), metric_value(
        text, "ragllm_engine_generation_tokens_total"
    )


def _running(server) -> float:
    return metric_value(httpx.get(f"{server.url}/metrics").text, "vllm:num_requests_running")


def _wait_idle(server) -> None:
    deadline = time.monotonic() + 20
    while _running(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def test_each_answer_spends_its_prompt_and_completion_tokens(billed):
    wait_clear_of_window_edge()
    before = _remaining(billed, "payer")
    spent = 0
    for stream in (False, True):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6,
            "temperature": 0,
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }
        response = httpx.post(
            f"{billed.url}/v1/chat/completions",
            headers={**_auth("payer"), **NO_CACHE},
            json=body,
            timeout=60,
        )
        assert response.status_code == 200, response.text
        usage = _usage(response, stream)
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        spent += usage["prompt_tokens"] + usage["completion_tokens"]
        assert _remaining_once_settled(billed, "payer", before - spent) == before - spent


def _usage(response: httpx.Response, stream: bool) -> dict:
    if not stream:
        return response.json()["usage"]
    events = [
        json.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    return events[-1]["usage"]


def test_a_response_cache_hit_spends_nothing(billed, shared_redis_url):
    wait_clear_of_window_edge()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a fruit."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    before = _remaining(billed, "cached")
    miss = httpx.post(
        f"{billed.url}/v1/chat/completions", headers=_auth("cached"), json=body, timeout=60
    )
    assert miss.headers["x-ragllm-cache"] == "miss"
    cost = miss.json()["usage"]["prompt_tokens"] + miss.json()["usage"]["completion_tokens"]
    assert _remaining_once_settled(billed, "cached", before - cost) == before - cost
    hit = httpx.post(
        f"{billed.url}/v1/chat/completions", headers=_auth("cached"), json=body, timeout=60
    )
    assert hit.headers["x-ragllm-cache"] == "hit"
    entry = _entry(
        billed, shared_redis_url, hit.headers["x-request-id"]
    )  # logged with the usage it replays
    assert (
        entry["cache"] == "hit"
        and int(entry["completion_tokens"]) == miss.json()["usage"]["completion_tokens"]
    )
    time.sleep(0.3)  # the charge would follow the log entry at once
    assert _remaining(billed, "cached") == before - cost


@pytest.mark.parametrize("chunks", LEAVE_AFTER)
def test_a_stream_left_early_is_charged_exactly_what_the_engine_made(
    billed, shared_redis_url, chunks
):
    key = f"leaver-{chunks}"
    wait_clear_of_window_edge()
    _wait_idle(billed)
    before = _remaining(billed, key)
    prompt_before, generated_before = _tokens_counted(billed)
    engine_before = _engine_counted(billed)
    prompt_tokens = httpx.post(
        f"{billed.url}/tokenize",
        headers=_auth(key),
        timeout=30,
        json={"model": MODEL, "messages": QUESTION},
    ).json()["count"]
    received = 0
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{billed.url}/v1/chat/completions",
        headers={**_auth(key), **NO_CACHE},
        json=body,
        timeout=60,
    ) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and (
                json.loads(line[6:])["choices"][0]["delta"].get("content")
            ):
                received += 1
                if received == chunks:
                    break
    entry = _entry(billed, shared_redis_url, request_id)
    assert entry["status"] == "499"
    assert int(entry["prompt_tokens"]) == prompt_tokens
    assert int(entry["completion_tokens"]) >= received
    charged = int(entry["prompt_tokens"]) + int(entry["completion_tokens"])
    assert _remaining_once_settled(billed, key, before - charged) == before - charged
    prompt_after, generated_after = _tokens_counted(billed)
    assert prompt_after - prompt_before == prompt_tokens
    assert generated_after - generated_before == int(entry["completion_tokens"])
    _wait_idle(
        billed
    )  # charged exactly what the engine made, the step it ran after the client left too
    engine_after = _engine_counted(billed)
    assert (engine_after[0] - engine_before[0], engine_after[1] - engine_before[1]) == (
        int(entry["prompt_tokens"]),
        int(entry["completion_tokens"]),
    )


def test_a_client_gone_before_a_whole_answer_is_charged_what_the_engine_made(
    billed, shared_redis_url
):
    wait_clear_of_window_edge()
    _wait_idle(billed)
    before = _remaining(billed, "waiter")
    engine_before = _engine_counted(billed)
    connection = _post_raw(
        billed.url,
        "waiter",
        {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "temperature": 0},
    )
    deadline = time.monotonic() + 20
    while _running(billed) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # some tokens made (the packaged model makes ~15 a second here)
    connection.close()
    entry = _entry(billed, shared_redis_url, key="waiter")
    assert entry["status"] == "499" and entry["stream"] in ("False", "0", "false")
    assert int(entry["prompt_tokens"]) > 0 and int(entry["completion_tokens"]) > 0, entry
    charged = int(entry["prompt_tokens"]) + int(entry["completion_tokens"])
    assert _remaining_once_settled(billed, "waiter", before - charged) == before - charged
    _wait_idle(billed)
    engine_after = _engine_counted(billed)
    assert (engine_after[0] - engine_before[0], engine_after[1] - engine_before[1]) == (
        int(entry["prompt_tokens"]),
        int(entry["completion_tokens"]),
    )


def _post_raw(url: str, key: str, body: dict, send_bytes: int | None = None) -> socket.socket:
    """A chat request on a raw connection (the test decides when the client leaves); ``send_bytes``:
    send only that much of the body, as a client that leaves mid-upload does."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    connection = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer secret-{key}\r\nCache-Control: no-cache, no-store\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    connection.sendall(head + payload[:send_bytes])
    return connection


@pytest.mark.parametrize("uploaded", UPLOADED)
def test_a_client_gone_mid_upload_is_a_499_without_a_traceback(billed, shared_redis_url, uploaded):
    key = f"uploader-{uploaded}"
    wait_clear_of_window_edge()
    status_line = 'ragllm_requests_total{endpoint="/v1/chat/completions",status="%s"}'
    metrics = httpx.get(f"{billed.url}/metrics").text
    closed_before = _metric_or_zero(metrics, status_line % "499")
    failed_before = _metric_or_zero(metrics, status_line % "500")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x" * 20_000}],
        "max_tokens": 4,
    }
    connection = _post_raw(billed.url, key, body, send_bytes=uploaded)
    time.sleep(0.3)
    connection.close()
    entry = _entry(billed, shared_redis_url, key=key)
    assert entry["status"] == "499" and entry["finish_reason"] == "cancelled"
    assert (int(entry["prompt_tokens"]), int(entry["completion_tokens"])) == (0, 0)
    metrics = httpx.get(f"{billed.url}/metrics").text
    assert _metric_or_zero(metrics, status_line % "499") == closed_before + 1
    assert _metric_or_zero(metrics, status_line % "500") == failed_before
    log = billed.log_tail_full()
    assert "Traceback" not in log
    assert sum(key in line for line in log.splitlines()) == 1  # its request-log line, nothing else


def _metric_or_zero(text: str, name: str) -> float:
    try:
        return metric_value(text, name)
    except KeyError:
        return 0.0
