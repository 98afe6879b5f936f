"""Redis dies mid-load and comes back: every request is answered, and the log ends up complete."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import redis

from tests.support.servers import MODEL, RedisServer, ServerProcess, metric_value

NUM_REQUESTS = 36
CONCURRENCY = 3


def _request(url: str, index: int) -> tuple[int, str]:
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Say the number {index}."}],
        "temperature": 0,
        "max_tokens": 4,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=60)
    return response.status_code, response.headers.get("x-request-id", "")


def test_service_rides_through_a_redis_restart(tmp_path):
    redis_server = RedisServer(tmp_path).start()
    server = ServerProcess(
        env={
            "REDIS_URL": redis_server.url,
            "RAGLLM_REDIS__TIMEOUT_S": "0.1",
            "RAGLLM_REDIS__RETRY_INTERVAL_S": "0.3",
            "RAGLLM_LIMITS__RPM": "1000",
        },
        log_dir=tmp_path,
    )
    try:
        server.wait_ready()
        results: list[tuple[int, str]] = []
        degraded_seen = False
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            futures = [pool.submit(_request, server.url, i) for i in range(NUM_REQUESTS)]
            while sum(f.done() for f in futures) < NUM_REQUESTS // 3:
                time.sleep(0.05)
            redis_server.kill()  # hard kill, mid-run
            while sum(f.done() for f in futures) < 2 * NUM_REQUESTS // 3:
                time.sleep(0.05)
            degraded_seen = httpx.get(f"{server.url}/health").json()["redis"] == "degraded"
            redis_server.start()  # same port, same directory: the append-only file comes back
            results = [f.result() for f in futures]
        assert [status for status, _ in results] == [200] * NUM_REQUESTS
        assert degraded_seen
        expected_ids = {request_id for _, request_id in results}
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        deadline = time.monotonic() + 15
        logged: set[str] = set()
        while time.monotonic() < deadline and not expected_ids <= logged:
            logged = {fields["request_id"] for _, fields in client.xrange("ragllm:requests")}
            time.sleep(0.2)
        assert expected_ids <= logged
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric_value(metrics, "ragllm_redis_fallbacks_total") > 0
        assert httpx.get(f"{server.url}/health").json()["redis"] == "ok"
    finally:
        server.stop()
        redis_server.kill()
