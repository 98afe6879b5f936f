"""Fair admission on a real server (local profile): a long RAG-sized prompt is not held behind
running answers, and a request that cannot start in time gets a 503 rather than waiting forever."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import uuid

import httpx
import pytest

from tests.support.servers import MODEL, ServerProcess

NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def _long_prompt(server_url: str, target_tokens: int = 1500) -> str:
    """Distinct sentences up to about ``target_tokens`` tokens."""
    sentences = [
        f"Record {i}: the warehouse in district {i * 37 % 101} shipped {i * 13 % 89} crates "
        f"of item {i * 7 % 53} on day {i % 28 + 1}."
        for i in range(target_tokens // 5)
    ]
    low, high = 1, len(sentences)
    while low < high:  # the longest prefix that stays within the target
        middle = (low + high + 1) // 2
        count = httpx.post(
            f"{server_url}/tokenize", json={"model": MODEL, "prompt": " ".join(sentences[:middle])}
        )
        if count.json()["count"] <= target_tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(sentences[:low])


def _first_token_s(url: str, prompt: str, max_tokens: int = 1) -> float:
    """Seconds from sending a streaming completion to its first text event. A fresh ``cache_salt``
    each time: the prompt is computed whole every time, never found in the prefix cache."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "cache_salt": uuid.uuid4().hex,
    }
    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers=NO_CACHE, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                return time.perf_counter() - started
    raise AssertionError("no token arrived")


def _long_answer(
    url: str, question: str, first_token: threading.Event, finished_at: list[float]
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 200,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=NO_CACHE, timeout=300
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                first_token.set()
    finished_at.append(time.perf_counter())


def _under_load_and_alone(url: str, prompt: str) -> tuple[float, float]:
    """The prompt's time to first token alone, then sent while three 200-token answers stream;
    asserts it came before the answers finished."""
    alone = _first_token_s(url, prompt)
    started = [threading.Event() for _ in range(3)]
    finished_at: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = [
            pool.submit(
                _long_answer, url, f"Write a long story about ship {i}.", started[i], finished_at
            )
            for i in range(3)
        ]
        assert all(event.wait(60) for event in started)
        sent = time.perf_counter()
        under_load = _first_token_s(url, prompt)
        first_token_at = sent + under_load
        for answer in answers:
            answer.result()
    assert first_token_at < min(finished_at), (
        "the long prompt waited for the running answers to finish"
    )
    return under_load, alone


@pytest.mark.parametrize("prompt_tokens", [1500, 3300])
def test_a_long_prompt_starts_while_long_answers_stream(server, prompt_tokens):
    """First token under load within 2x of alone. The box is shared and noisy, so alone and under
    load are measured back to back and one more pair is measured before a ratio over 2 fails."""
    prompt = _long_prompt(server.url, prompt_tokens)
    ratios = []
    for _ in range(2):
        under_load, alone = _under_load_and_alone(server.url, prompt)
        ratios.append(f"{under_load:.2f} s under load vs {alone:.2f} s alone")
        if under_load <= 2 * alone:
            return
    raise AssertionError(
        f"time to first token of a {prompt_tokens}-token prompt: {'; '.join(ratios)}"
    )


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    """One sequence at a time and a 2 s bound on waiting for it."""
    server = ServerProcess(
        log_dir=tmp_path_factory.mktemp("one-slot"),
        env={"VLLM_MAX_NUM_SEQS": "1", "RAGLLM_ENGINE__MAX_QUEUE_WAIT_S": "2"},
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_a_request_that_cannot_start_in_time_gets_503_with_retry_after(one_slot):
    long = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 150,
        "ignore_eos": True,
        "temperature": 0,
    }
    short = {**long, "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            httpx.post, f"{one_slot.url}/v1/completions", json=long, headers=NO_CACHE, timeout=120
        )
        time.sleep(0.5)
        started = time.perf_counter()
        waited = httpx.post(
            f"{one_slot.url}/v1/completions", json=short, headers=NO_CACHE, timeout=60
        )
        elapsed = time.perf_counter() - started
        assert running.result().status_code == 200
    assert waited.status_code == 503 and waited.json()["error"]["code"] == "engine_overloaded"
    assert int(waited.headers["retry-after"]) >= 1
    assert 2 <= elapsed < 10
    assert httpx.get(f"{one_slot.url}/health").json()["running"] == 0
