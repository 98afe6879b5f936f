"""One request's fault never touches another: faults injected into a real server's engine.

``tests/support/fault_server.py`` runs the real ``ragllm serve`` with faults wired into its engine,
chosen by a request's seed: a sampling fault (one sequence's) and a device fault (no sequence's).
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.support.fault_server import DEVICE_FAULT_SEED, HANG_FAULT_SEED, SAMPLING_FAULT_SEED
from tests.support.servers import MODEL, ServerProcess
from tests.support.sse import post_stream

FAULT_SERVER = ("-m", "tests.support.fault_server")
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
QUESTIONS = [
    "Name three rivers in Europe.",
    "What is a prime number?",
    "Describe a cat in one line.",
    "Why is the sky blue?",
]


def _payload(
    content: str, seed: int | None = None, max_tokens: int = 24, stream: bool = True
) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if seed is not None:
        body["seed"] = seed
    return body


def _solo(url: str, content: str) -> str:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json=_payload(content, stream=False),
        headers=NO_CACHE,
        timeout=120,
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    server = ServerProcess(command=FAULT_SERVER, log_dir=tmp_path_factory.mktemp("faulty"))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_a_sampling_fault_fails_its_own_request_and_no_other(faulty):
    solo = [_solo(faulty.url, question) for question in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS) + 1) as pool:
        faulted = pool.submit(
            post_stream, faulty.url, _payload("Tell me about bridges.", SAMPLING_FAULT_SEED)
        )
        others = [pool.submit(post_stream, faulty.url, _payload(q), NO_CACHE) for q in QUESTIONS]
        results = [future.result() for future in others]
        fault = faulted.result()
    assert [r.text for r in results] == solo
    assert all(r.finish_reason == "length" and r.ends_with_done for r in results)
    assert (
        fault.error is not None and fault.error["code"] == "engine_error" and fault.ends_with_done
    )
    assert "FloatingPointError" in fault.error["message"]
    assert httpx.get(f"{faulty.url}/health").json()["status"] == "ok"
    assert _solo(faulty.url, QUESTIONS[0]) == solo[0]  # and the engine goes on as before


def test_a_sampling_fault_in_a_whole_answer_is_a_500_for_that_request_alone(faulty):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        faulted = pool.submit(
            httpx.post,
            f"{faulty.url}/v1/chat/completions",
            headers=NO_CACHE,
            timeout=120,
            json=_payload("Tell me about ships.", SAMPLING_FAULT_SEED, stream=False),
        )
        other = pool.submit(_solo, faulty.url, QUESTIONS[1])
        response, text = faulted.result(), other.result()
    assert response.status_code == 500 and response.json()["error"]["code"] == "engine_error"
    assert text == _solo(faulty.url, QUESTIONS[1])


def test_a_device_fault_takes_the_engine_out_of_service_and_the_process_exits_70(tmp_path):
    server = ServerProcess(
        command=FAULT_SERVER,
        log_dir=tmp_path,
        env={"RAGLLM_SERVER__EXIT_ON_ENGINE_FAILURE": "false"},
    ).wait_ready()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(
                post_stream, server.url, _payload(QUESTIONS[0], max_tokens=200), NO_CACHE
            )
            time.sleep(1.0)
            broken = post_stream(
                server.url, _payload("Break the device.", DEVICE_FAULT_SEED), NO_CACHE
            )
            bystander = running.result()
        # Every request in flight ends with a 503-class error, in-band or as its status.
        for result in (bystander, broken):
            assert result.ends_with_done or result.status == 503, result
            assert (result.error or {}).get("code") == "engine_not_ready" or result.status == 503
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "engine failed" in health.json()["detail"]
        refused = httpx.post(
            f"{server.url}/v1/chat/completions", json=_payload("Hello?", stream=False)
        )
        assert refused.status_code == 503 and refused.headers["retry-after"]
    finally:
        server.stop()

    exiting = ServerProcess(command=FAULT_SERVER, log_dir=tmp_path).wait_ready()
    post_stream(exiting.url, _payload("Break the device.", DEVICE_FAULT_SEED), NO_CACHE)
    assert exiting.process.wait(timeout=30) == 70
    exiting.stop()


def test_a_hung_engine_is_reported_and_the_process_exits_70(tmp_path):
    server = ServerProcess(
        command=FAULT_SERVER, log_dir=tmp_path, env={"RAGLLM_ENGINE__STALL_TIMEOUT_S": "2"}
    ).wait_ready()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hung = pool.submit(
                post_stream, server.url, _payload("Hang.", HANG_FAULT_SEED), NO_CACHE, timeout=30
            )
            unhealthy = server.wait_until(
                lambda response: response.status_code == 503, timeout_s=10
            )
            assert "completed no step" in unhealthy.json()["detail"]
            assert server.process.wait(timeout=20) == 70
            # The stream the hung engine held ends properly too, as a 503 the client can retry elsewhere.
            result = hung.result()
            assert result.ends_with_done and result.error["code"] == "server_shutting_down"
    finally:
        server.stop()
