"""Bounded work: body limits while reading, authentication before parsing, request bounds, and an
event loop that stays responsive while a huge request is handled. Real server, real HTTP."""

from __future__ import annotations

import concurrent.futures
import statistics
import time

import httpx
import pytest

from tests.support.servers import MODEL, ServerProcess

KEY = "tester:s3cret"
AUTH = {"Authorization": "Bearer s3cret"}
BODY_LIMIT = 4 * 1024 * 1024
TEXT_LIMIT = 3 * 1024 * 1024
POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Keys required, a 4 MiB body limit, a 3 MiB text bound, and document bounds raised far enough to
    accept 30,000."""
    server = ServerProcess(
        log_dir=tmp_path_factory.mktemp("guarded"),
        env={
            "RAGLLM_AUTH__KEYS": KEY,
            "RAGLLM_SERVER__MAX_BODY_BYTES": str(BODY_LIMIT),
            "RAGLLM_INPUT__MAX_DOCUMENTS": "50000",
            "RAGLLM_INPUT__MAX_DOCUMENTS_BYTES": str(BODY_LIMIT),
            "RAGLLM_INPUT__MAX_TEXT_BYTES": str(TEXT_LIMIT),
        },
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _chunks(total: int, size: int = 64 * 1024):
    """A body sent chunked (no Content-Length), as a client that hides its size would."""
    sent = 0
    yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}'


@pytest.mark.parametrize("path", POST_ROUTES)
def test_a_chunked_body_over_the_limit_gets_413_on_every_post_route(guarded, path):
    response = httpx.post(
        f"{guarded.url}{path}", content=_chunks(BODY_LIMIT + 1024 * 1024), headers=AUTH, timeout=60
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    declared = httpx.post(
        f"{guarded.url}{path}", content=b"x" * (BODY_LIMIT + 1), headers=AUTH, timeout=60
    )
    assert declared.status_code == 413


@pytest.mark.parametrize("path", POST_ROUTES)
def test_unauthenticated_requests_get_401_before_the_body_is_parsed(guarded, path):
    malformed = httpx.post(f"{guarded.url}{path}", content=b"{not json", timeout=30)
    assert malformed.status_code == 401 and malformed.json()["error"]["code"] == "invalid_api_key"
    # A large body from a client without a key is refused without being read to its end.
    started = time.perf_counter()
    large = httpx.post(
        f"{guarded.url}{path}",
        content=_chunks(3 * 1024 * 1024),
        headers={"Authorization": "Bearer wrong"},
        timeout=30,
    )
    assert large.status_code == 401
    assert time.perf_counter() - started < 5


def test_request_bounds_are_clear_400s(server):
    def chat(**fields):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            **fields,
        }
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)

    cases = {
        "temperature": chat(temperature=1e-40),
        "stop": chat(stop=["x" * 300]),
        "seed": chat(seed=2**70),
        "chat_template_kwargs.chat_template": chat(
            chat_template_kwargs={"chat_template": "{{ 'pwned' }}"}
        ),
        "chat_template_kwargs.tokenize": chat(chat_template_kwargs={"tokenize": True}),
        "documents": chat(documents=[{"id": f"d{i}", "text": "x"} for i in range(1025)]),
        "messages": chat(messages=[{"role": "user", "content": "hi"}] * 1025),
    }
    for param, response in cases.items():
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param, (param, response.text)
    assert chat(temperature=0.01).status_code == 200


def _health_latencies(url: str, until: concurrent.futures.Future) -> list[float]:
    latencies = []
    with httpx.Client(timeout=10) as client:
        while not until.done():
            started = time.perf_counter()
            assert client.get(f"{url}/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    return latencies


def test_health_answers_within_100_ms_while_30000_documents_are_handled(guarded):
    documents = [
        {
            "id": f"doc{i}",
            "text": f"Fact {i}: the depot in town {i % 97} opens at {i % 12 + 1} o'clock.",
            "score": (i * 7919) % 1000 / 1000,
        }
        for i in range(30_000)
    ]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "When does the depot open?"}],
        "documents": documents,
        "max_tokens": 4,
        "temperature": 0,
    }
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        handled = pool.submit(
            httpx.post, f"{guarded.url}/v1/chat/completions", json=body, headers=AUTH, timeout=300
        )
        time.sleep(0.05)
        latencies = _health_latencies(guarded.url, handled)
        response = handled.result()
    assert response.status_code == 200, response.text
    report = response.json()["rag"]
    assert (
        report["used_documents"] and len(report["dropped_documents"]) > 29_000
    )  # packed, not refused
    print(
        f"\n/health during 30,000 documents: {len(latencies)} probes, median "
        f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    assert len(latencies) >= 5
    # A blocked event loop (what this guards against) holds every probe for the seconds the packing
    # takes; on a shared 2-core machine a probe in a thousand may still wait a few tenths of a second
    # for the OS scheduler or a collection of the 30,000 parsed documents (CI saw one at 263 ms).
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    assert p99 < 0.1 and max(latencies) < 1.0, (
        f"/health p99 {p99 * 1000:.0f} ms, max "
        f"{max(latencies) * 1000:.0f} ms (median {statistics.median(latencies) * 1000:.1f} ms)"
    )


def _resident_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_an_unfittable_8_mib_prompt_is_refused_from_its_length_without_tokenizing(server):
    """8 MiB of text is within the text bound, but no tokenization could fit it in the context: it is
    refused from its byte length, so neither the memory nor the event loop feels it."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "word " * (8 * 1024 * 1024 // 5 - 16)}],
        "max_tokens": 4,
    }
    before = _resident_mb(server.process.pid)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refused = pool.submit(
            lambda: [
                httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
                for _ in range(3)
            ]
        )
        latencies = _health_latencies(server.url, refused)
        responses = refused.result()
    grown = _resident_mb(server.process.pid) - before
    for response in responses:
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert response.json()["error"]["param"] == "max_tokens"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(
        f"\nthree 8 MiB prompts refused: resident memory +{grown:.0f} MB, /health p99 {p99 * 1000:.1f} ms"
    )
    assert grown < 100
    assert p99 < 0.1


def test_tool_definitions_and_call_arguments_count_in_the_text_budget(guarded):
    """One budget for everything a prompt is made of: tool descriptions and call arguments that fit
    the body limit are refused once, with the messages, they pass the text bound."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"f{i}",
                "description": "d" * (1024 * 1024),
                "parameters": {"type": "object"},
            },
        }
        for i in range(3)
    ]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": tools,
        "max_tokens": 2,
    }
    response = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 413, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["param"] == "tools"
    assert "tools, tool-call arguments and schemas" in error["message"]
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "f0", "arguments": '{"a": "%s"}' % ("x" * TEXT_LIMIT)},
    }
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [call]},
        ],
    }
    response = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["param"] == "tools", (
        response.text[:300]
    )
