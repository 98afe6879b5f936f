"""Graceful shutdown: SIGTERM during running streams drains them, logs them, and exits 0; an answer
generated in full but not yet read is flushed to a client that keeps reading, however slowly."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import httpx
import redis

from tests.support.servers import MODEL, ServerProcess, metric_value, send_chat_raw
from tests.support.sse import parse

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
STREAMS = 8


def _stream(url: str, index: int, first_token: threading.Barrier) -> tuple[int, bytes, str]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell story number {index}."}],
        "max_tokens": 40,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    raw = b""
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=NO_CACHE, timeout=120
    ) as response:
        for chunk in response.iter_raw():
            if not raw and b'"content"' in chunk:
                first_token.wait(60)
            raw += chunk
        return response.status_code, raw, response.headers["x-request-id"]


def test_sigterm_drains_running_streams_then_exits_0(tmp_path, shared_redis_url):
    prefix = f"ragllm-drain-{os.urandom(4).hex()}"
    server = ServerProcess(
        log_dir=tmp_path,
        env={
            "VLLM_MAX_NUM_SEQS": str(STREAMS),
            "VLLM_MAX_BATCH_SIZE": str(STREAMS),
            "REDIS_URL": shared_redis_url,
            "RAGLLM_REDIS__PREFIX": prefix,
            "RAGLLM_SERVER__SHUTDOWN_GRACE_S": "60",
        },
    ).wait_ready()
    all_started = threading.Barrier(STREAMS + 1)
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        streams = [pool.submit(_stream, server.url, i, all_started) for i in range(STREAMS)]
        all_started.wait(60)  # every stream has its first token
        os.kill(server.process.pid, signal.SIGTERM)
        health = server.wait_until(lambda response: response.status_code == 503, timeout_s=10)
        assert health.json()["status"] == "draining"
        refused = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=10,
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert (
            refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        )
        assert refused.headers["retry-after"] == "1"
        results = [future.result() for future in streams]
    assert server.process.wait(timeout=60) == 0
    server.stop()
    for status, raw, _ in results:
        result = parse(status, raw)
        assert status == 200 and result.finish_reason == "length" and result.ends_with_done
    logged = {
        fields["request_id"]: fields
        for _, fields in redis.Redis.from_url(shared_redis_url, decode_responses=True).xrange(
            f"{prefix}:requests"
        )
    }
    for _, _, request_id in results:
        assert (
            logged[request_id]["status"] == "200"
            and logged[request_id]["completion_tokens"] == "40"
        )


# ~2 KB an event (20 top log probabilities a token): the answer is ~300 KB, generated in ~10 s here and
# read at ~10 KB/s, so once it is generated most of it still waits in its outbox (the connection's own
# buffers hold ~100 KB of it).
SLOW_READ_BYTES, SLOW_READ_INTERVAL_S = 1024, 0.1
SLOW_ANSWER_TOKENS = 150
LARGE_ANSWER = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
    "max_tokens": SLOW_ANSWER_TOKENS,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 20,
}


class SlowReader(threading.Thread):
    """Reads its connection at a trickle until the server closes it."""

    def __init__(self, connection) -> None:
        super().__init__(daemon=True)
        self.connection = connection
        self.received = bytearray()
        self.closed_at: float | None = None

    def run(self) -> None:
        self.connection.settimeout(120)
        try:
            while chunk := self.connection.recv(SLOW_READ_BYTES):
                self.received += chunk
                time.sleep(SLOW_READ_INTERVAL_S)
        except OSError:
            pass
        self.closed_at = time.monotonic()


def _engine_idle(url: str) -> bool:
    health = httpx.get(f"{url}/health", timeout=5).json()
    return health["running"] == 0 and health["waiting"] == 0


def test_sigterm_flushes_a_generated_answer_to_a_slow_reader(tmp_path, shared_redis_url):
    prefix = f"ragllm-drain-slow-{os.urandom(4).hex()}"
    server = ServerProcess(
        log_dir=tmp_path,
        env={
            "REDIS_URL": shared_redis_url,
            "RAGLLM_REDIS__PREFIX": prefix,
            "RAGLLM_SERVER__SHUTDOWN_GRACE_S": "60",
            "RAGLLM_SERVER__WRITE_TIMEOUT_S": "60",
        },
    ).wait_ready()
    try:
        with send_chat_raw(server.url, LARGE_ANSWER, small_window=True) as connection:
            reader = SlowReader(connection)
            reader.start()
            deadline = time.monotonic() + 120
            while not (reader.received and _engine_idle(server.url)):
                assert time.monotonic() < deadline, "the answer was not generated"
                time.sleep(0.1)
            read_at_sigterm = len(reader.received)
            in_flight = metric_value(
                httpx.get(f"{server.url}/metrics", timeout=5).text, "ragllm_requests_in_flight"
            )
            signalled = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)
            reader.join(90)
            exit_status = server.process.wait(timeout=60)
        received = bytes(reader.received)
    finally:
        server.stop()
    head, _, body = received.partition(b"\r\n\r\n")
    print(
        f"\nSIGTERM once the answer was generated, the client having read {read_at_sigterm:,} bytes (requests "
        f"in flight: {in_flight:.0f}); it read {len(received):,} in all, the last {reader.closed_at - signalled:.1f} s "
        f"after the signal; exit status {exit_status}"
    )
    assert head.startswith(b"HTTP/1.1 200")
    payload = _unchunked(body)
    print(f"the stream's last bytes: {payload[-60:]!r}")
    assert (
        len(received) > 1.5 * read_at_sigterm
    )  # much of the answer was still unread at the signal ...
    assert in_flight == 1  # ... part of it in the outbox: the response was still being sent
    result = parse(200, payload)
    assert result.ends_with_done and result.finish_reason == "length" and result.error is None
    assert exit_status == 0
    [entry] = [
        fields
        for _, fields in redis.Redis.from_url(shared_redis_url, decode_responses=True).xrange(
            f"{prefix}:requests"
        )
    ]
    assert entry["status"] == "200" and entry["completion_tokens"] == str(SLOW_ANSWER_TOKENS)


def _unchunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's payload."""
    payload = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        payload, body = payload + rest[:length], rest[length + 2 :]
    return payload
