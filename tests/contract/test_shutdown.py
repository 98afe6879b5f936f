"""Graceful shutdown: SIGTERM during running streams drains them, logs them, and exits 0."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading

import httpx
import redis

from tests.servers import MODEL, ServerProcess
from tests.sse import parse

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
STREAMS = 8


def _stream(url: str, index: int, first_token: threading.Barrier) -> tuple[int, bytes, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell story number {index}."}],
            "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
    raw = b""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=NO_CACHE, timeout=120) as response:
        for chunk in response.iter_raw():
            if not raw and b'"content"' in chunk:
                first_token.wait(60)
            raw += chunk
        return response.status_code, raw, response.headers["x-request-id"]


def test_sigterm_drains_running_streams_then_exits_0(tmp_path, shared_redis_url):
    prefix = f"ragllm-drain-{os.urandom(4).hex()}"
    server = ServerProcess(log_dir=tmp_path, env={
        "VLLM_MAX_NUM_SEQS": str(STREAMS), "VLLM_MAX_BATCH_SIZE": str(STREAMS), "REDIS_URL": shared_redis_url,
        "RAGLLM_REDIS__PREFIX": prefix, "RAGLLM_SERVER__SHUTDOWN_GRACE_S": "60"}).wait_ready()
    all_started = threading.Barrier(STREAMS + 1)
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        streams = [pool.submit(_stream, server.url, i, all_started) for i in range(STREAMS)]
        all_started.wait(60)  # every stream has its first token
        os.kill(server.process.pid, signal.SIGTERM)
        health = server.wait_until(lambda response: response.status_code == 503, timeout_s=10)
        assert health.json()["status"] == "draining"
        refused = httpx.post(f"{server.url}/v1/chat/completions", timeout=10,
                             json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert refused.headers["retry-after"] == "1"
        results = [future.result() for future in streams]
    assert server.process.wait(timeout=60) == 0
    server.stop()
    for status, raw, _ in results:
        result = parse(status, raw)
        assert status == 200 and result.finish_reason == "length" and result.ends_with_done
    logged = {fields["request_id"]: fields for _, fields in
              redis.Redis.from_url(shared_redis_url, decode_responses=True).xrange(f"{prefix}:requests")}
    for _, _, request_id in results:
        assert logged[request_id]["status"] == "200" and logged[request_id]["completion_tokens"] == "40"
