"""Streaming clients that stop reading cannot hold engine slots: generation is decoupled from the
socket, the answer waits in a bounded buffer, and the connection is dropped after the write timeout
(or at once when the buffer bound is hit, cancelling generation). Each such request is recorded once,
as 408, with the tokens produced for it.

The non-reading client is a raw socket with a tiny receive buffer and a small segment size (so the
server's kernel send buffer stays small too, and a ~100 KB answer already blocks the server's writes);
the answers carry 20 top log probabilities a token to be that large in a few seconds of generation.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import openai
import pytest
import redis

from tests.support.servers import MODEL, ServerProcess, metric_value, send_chat_raw

WRITE_TIMEOUT_S = 10.0  # long enough for an answer to finish generating after its writes block
MAX_TOKENS = 100
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
# ~2 KB an event: 100 events are about twice what a non-reading client's connection absorbs.
LARGE_ANSWER = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 20,
}


def _serve(tmp_path_factory, redis_url: str, name: str, **settings: str) -> ServerProcess:
    prefix = f"ragllm-slow-{os.urandom(4).hex()}"
    # Two running and two waiting: four requests fill the engine's admission.
    server = ServerProcess(
        log_dir=tmp_path_factory.mktemp(name),
        env={
            "VLLM_MAX_NUM_SEQS": "2",
            "RAGLLM_ENGINE__MAX_WAITING": "2",
            "REDIS_URL": redis_url,
            "RAGLLM_REDIS__PREFIX": prefix,
            **settings,
        },
    )
    server.prefix = prefix
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_redis_url):
    process = _serve(
        tmp_path_factory,
        shared_redis_url,
        "slow-readers",
        RAGLLM_SERVER__WRITE_TIMEOUT_S=str(WRITE_TIMEOUT_S),
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def small_buffer_server(tmp_path_factory, shared_redis_url):
    """The smallest stream buffer and a write timeout far away: the buffer bound is what drops."""
    process = _serve(
        tmp_path_factory,
        shared_redis_url,
        "slow-readers-buffer",
        RAGLLM_SERVER__WRITE_TIMEOUT_S="120",
        RAGLLM_SERVER__STREAM_BUFFER_BYTES="4096",
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def _non_reader(url: str, body: dict) -> socket.socket:
    """A streaming request on a connection whose client never reads (the caller closes it)."""
    return send_chat_raw(url, body, small_window=True)


def _peek(connection: socket.socket) -> bytes | None:
    """The first bytes that arrived, without reading them (None: nothing yet)."""
    try:
        return connection.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


def _engine_idle(url: str) -> bool:
    health = httpx.get(f"{url}/health", timeout=5).json()
    return health["running"] == 0 and health["waiting"] == 0


def _metric(url: str, name: str) -> float:
    try:
        return metric_value(httpx.get(f"{url}/metrics", timeout=5).text, name)
    except KeyError:
        return 0.0


def _slow_clients(url: str, reason: str) -> float:
    return _metric(url, f'ragllm_slow_clients_total{{reason="{reason}"}}')


def _read_until_closed(connection: socket.socket, timeout_s: float = 10) -> bytes:
    """What the client can still read once the server dropped it; AssertionError if it stays open."""
    connection.settimeout(timeout_s)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError("the server still holds the connection open") from None
    return received


def _logged_too_slow(redis_url: str, prefix: str, count: int) -> list[dict]:
    """The request log's 408 entries, once there are ``count`` of them (it is written asynchronously)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    entries: list[dict] = []

    def logged() -> bool:
        nonlocal entries
        entries = [
            fields for _, fields in client.xrange(f"{prefix}:requests") if fields["status"] == "408"
        ]
        return len(entries) >= count

    _wait_for(logged, 10, f"{count} requests logged as 408")
    return entries


def test_a_client_that_stops_reading_frees_its_slot_and_is_dropped_after_the_write_timeout(
    server, shared_redis_url
):
    dropped_before = _slow_clients(server.url, "write_timeout")
    sent = time.monotonic()
    with _non_reader(server.url, LARGE_ANSWER) as connection:
        _wait_for(lambda: _peek(connection) is not None, 60, "the stream started")
        assert _peek(connection) == b"HTTP/1.1 200"
        # Its answer is generated while it reads nothing: the engine holds nothing for it ...
        _wait_for(lambda: _engine_idle(server.url), 60, "the non-reader's slot freed")
        freed_after = time.monotonic() - sent
        # ... though its connection is still being served (written to, not yet dropped).
        assert _metric(server.url, "ragllm_requests_in_flight") == 1
        assert _slow_clients(server.url, "write_timeout") == dropped_before
        started = time.monotonic()
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers=NO_CACHE,
            timeout=30,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 5,
            },
        )
        served_in = time.monotonic() - started
        assert answer.status_code == 200 and served_in < 10
        _wait_for(
            lambda: _slow_clients(server.url, "write_timeout") == dropped_before + 1,
            WRITE_TIMEOUT_S + 10,
            "the non-reader dropped",
        )
        dropped_after = time.monotonic() - sent
        received = _read_until_closed(connection)
        assert b"[DONE]" not in received
    print(
        f"\nnon-reader: slot free {freed_after:.1f} s after sending, another request served in "
        f"{served_in:.2f} s, dropped {dropped_after:.1f} s after sending; it could read {len(received):,} bytes"
    )
    assert _metric(server.url, "ragllm_requests_in_flight") == 0
    [entry] = _logged_too_slow(shared_redis_url, server.prefix, 1)
    assert entry["stream"] == "1" and entry["finish_reason"] == "length"
    assert int(entry["completion_tokens"]) == MAX_TOKENS  # generated in full, billed in full
    assert int(entry["prompt_tokens"]) > 0


def test_non_readers_filling_admission_do_not_turn_a_normal_client_away(server, shared_redis_url):
    already_logged = len(_logged_too_slow(shared_redis_url, server.prefix, 0))
    dropped_before = _slow_clients(server.url, "write_timeout")
    connections = [_non_reader(server.url, LARGE_ANSWER) for _ in range(4)]  # the whole admission
    try:
        for connection in connections:
            _wait_for(lambda: _peek(connection) is not None, 120, "every stream started")
            assert _peek(connection) == b"HTTP/1.1 200"
        _wait_for(lambda: _engine_idle(server.url), 60, "the non-readers' slots freed")
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60
        )
        for stream in (False, True, False):
            answer = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=5,
                stream=stream,
                extra_headers=NO_CACHE,
            )
            if stream:
                assert list(answer)[-1].choices[0].finish_reason is not None
            else:
                assert answer.choices[0].finish_reason is not None
        _wait_for(
            lambda: _slow_clients(server.url, "write_timeout") == dropped_before + 4,
            WRITE_TIMEOUT_S + 10,
            "every non-reader dropped",
        )
        for connection in connections:
            assert b"[DONE]" not in _read_until_closed(connection)
    finally:
        for connection in connections:
            connection.close()
    entries = _logged_too_slow(shared_redis_url, server.prefix, already_logged + 4)[already_logged:]
    assert len(entries) == 4
    print(
        "\n4 non-readers logged:",
        [(e["status"], e["finish_reason"], e["completion_tokens"]) for e in entries],
    )
    for entry in entries:  # on a slow machine a write may time out before its answer is complete
        assert 0 < int(entry["completion_tokens"]) <= MAX_TOKENS
        assert entry["finish_reason"] == (
            "length" if int(entry["completion_tokens"]) == MAX_TOKENS else "cancelled"
        )


def test_a_non_reader_that_fills_the_buffer_is_dropped_and_its_generation_cancelled(
    small_buffer_server, shared_redis_url
):
    server = small_buffer_server
    long_answer = {**LARGE_ANSWER, "max_tokens": 2000}  # minutes of generation on these CPUs
    with _non_reader(server.url, long_answer) as connection:
        _wait_for(
            lambda: _slow_clients(server.url, "buffer_full") == 1, 60, "the non-reader dropped"
        )
        _wait_for(lambda: _engine_idle(server.url), 10, "its generation cancelled")
        assert b"[DONE]" not in _read_until_closed(connection)
    [entry] = _logged_too_slow(shared_redis_url, server.prefix, 1)
    assert entry["finish_reason"] == "cancelled"
    print(f"\nbuffer bound hit: dropped after {entry['completion_tokens']} of 2000 tokens")
    assert 0 < int(entry["completion_tokens"]) < 2000  # what was produced is billed


NUM_NON_READERS = 8
BUDGET_BYTES = 256 * 1024  # about two non-readers' worth of a ~120 KB answer


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, shared_redis_url):
    """A total budget far below what the non-readers' answers add up to; each stream's own bound and the
    write timeout far above what one answer needs: the total budget is what drops."""
    process = _serve(
        tmp_path_factory,
        shared_redis_url,
        "slow-readers-budget",
        VLLM_MAX_NUM_SEQS=str(NUM_NON_READERS + 1),
        VLLM_MAX_BATCH_SIZE=str(NUM_NON_READERS + 1),
        RAGLLM_SERVER__WRITE_TIMEOUT_S="120",
        RAGLLM_SERVER__STREAM_BUFFER_BYTES=str(BUDGET_BYTES),
        RAGLLM_SERVER__STREAM_BUFFER_TOTAL_BYTES=str(BUDGET_BYTES),
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def test_non_readers_past_the_total_budget_are_dropped_early_while_a_reader_is_served(
    budget_server, shared_redis_url
):
    server = budget_server
    answer = {**LARGE_ANSWER, "max_tokens": 60}  # ~120 KB each: 8 of them hold ~4x the budget
    held: list[float] = []  # ragllm_stream_buffer_bytes, the budget's count, sampled throughout
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            held.append(_metric(server.url, "ragllm_stream_buffer_bytes"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    connections = [_non_reader(server.url, answer) for _ in range(NUM_NON_READERS)]
    try:
        reader = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        chunks = list(
            reader.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Write a long essay about the sea."}],
                max_tokens=60,
                temperature=0,
                stream=True,
                logprobs=True,
                top_logprobs=20,
                extra_body={"ignore_eos": True},
                extra_headers=NO_CACHE,
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"  # the reader got its whole answer
        assert (
            sum(
                len(c.choices[0].logprobs.content or ())
                for c in chunks
                if c.choices and c.choices[0].logprobs
            )
            == 60
        )

        _wait_for(lambda: _engine_idle(server.url), 120, "every answer generated or cancelled")
        sampling.set()
        sampler.join()
        dropped = _slow_clients(server.url, "budget_full")
        assert dropped >= NUM_NON_READERS - BUDGET_BYTES // (
            60 * 1024
        )  # most were dropped early ...
        assert _slow_clients(server.url, "write_timeout") == 0  # ... not by the write timeout
        assert len(held) >= 5 and 0 < max(held) <= BUDGET_BYTES
    finally:
        for connection in connections:
            connection.close()
    entries = _logged_too_slow(shared_redis_url, server.prefix, int(dropped))
    assert len(entries) == dropped  # each logged once, as 408, with the tokens produced for it
    for entry in entries:
        assert 0 < int(entry["completion_tokens"]) <= 60
        assert entry["finish_reason"] == (
            "length" if entry["completion_tokens"] == "60" else "cancelled"
        )
    print(
        f"\n{NUM_NON_READERS} non-readers, budget {BUDGET_BYTES // 1024} KiB: {dropped:.0f} dropped early "
        f"(budget_full), the reader got its whole answer; held at most {max(held) / 1024:.0f} KiB over "
        f"{len(held)} samples; logged "
        f"{[(e['status'], e['finish_reason'], e['completion_tokens']) for e in entries]}"
    )
