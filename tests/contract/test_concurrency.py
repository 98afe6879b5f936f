"""Continuous batching through HTTP: batched results equal solo ones; disconnects free the slot."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.support.servers import ServerProcess, metric_value

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2+2?",
    "Tell me about cats.",
    "Who wrote Hamlet?",
    "What is Python?",
    "Describe rain in one sentence.",
    "Why is the sky blue?",
]


NO_CACHE = {
    "Cache-Control": "no-cache, no-store"
}  # these tests are about the engine, not the cache


async def _greedy(client: openai.AsyncOpenAI, model: str, question: str) -> str:
    completion = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
        extra_headers=NO_CACHE,
    )
    return completion.choices[0].message.content


async def test_eight_concurrent_greedy_requests_match_solo_runs(async_client, model):
    solo = [await _greedy(async_client, model, q) for q in QUESTIONS]
    batched = await asyncio.gather(*(_greedy(async_client, model, q) for q in QUESTIONS))
    assert batched == solo
    assert len(set(solo)) == len(QUESTIONS)  # distinct prompts, so a mix-up would show


def _running(server) -> float:
    return metric_value(httpx.get(f"{server.url}/metrics").text, "vllm:num_requests_running")


def test_client_disconnect_mid_stream_frees_the_slot(server, model):
    disconnects_before = metric_value(
        httpx.get(f"{server.url}/metrics").text, "ragllm_client_disconnects_total"
    )
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=payload) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
            assert len(received) >= 3
            assert _running(server) == 1
    # 2,000 tokens would take minutes on this CPU; the slot must be freed at the next step instead.
    deadline = time.monotonic() + 10
    while _running(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(server) == 0
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "ragllm_client_disconnects_total") == disconnects_before + 1
    assert metric_value(text, "ragllm_requests_in_flight") == 0


async def test_disconnect_while_waiting_for_a_non_streaming_answer_frees_the_slot(server, model):
    disconnects_before = metric_value(
        httpx.get(f"{server.url}/metrics").text, "ragllm_client_disconnects_total"
    )
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
        "max_tokens": 2000,
        "temperature": 0,
    }
    async with httpx.AsyncClient(timeout=60) as http:
        request = asyncio.ensure_future(
            http.post(f"{server.url}/v1/chat/completions", json=payload)
        )
        deadline = time.monotonic() + 20
        while _running(server) != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _running(server) == 1
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    deadline = time.monotonic() + 10
    while _running(server) != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _running(server) == 0
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "ragllm_client_disconnects_total") == disconnects_before + 1
    assert 'status="499"' in text


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A server that admits one running request and queues none."""
    process = ServerProcess(
        env={"VLLM_MAX_NUM_SEQS": "1", "RAGLLM_ENGINE__MAX_WAITING": "0"},
        log_dir=tmp_path_factory.mktemp("tiny"),
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


async def test_full_queue_answers_503_and_loses_nothing_accepted(tiny_server, model):
    client = openai.AsyncOpenAI(
        base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0, timeout=120
    )
    first = asyncio.ensure_future(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Count to twenty."}],
            max_tokens=40,
            temperature=0,
        )
    )
    deadline = time.monotonic() + 20
    while _running(tiny_server) != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"]
    assert caught.value.code == "engine_overloaded"
    completion = await first  # the admitted request still completes
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 40


def test_model_that_fails_to_load_reports_503(tmp_path):
    process = ServerProcess("--model", str(tmp_path / "missing-model"), log_dir=tmp_path)
    try:
        response = process.wait_until(lambda r: r.json()["status"] == "error", timeout_s=60)
        assert response.status_code == 503
        body = response.json()
        assert "does not exist" in body["detail"]
        assert set(body) >= {"status", "model", "engine", "uptime_s"}
        chat = httpx.post(
            f"{process.url}/v1/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 503
        assert chat.json()["error"]["code"] == "engine_not_ready"
    finally:
        process.stop()
