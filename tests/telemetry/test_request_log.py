"""The request log counts a drop only when an entry is really lost, and writes each entry once."""

from __future__ import annotations

import asyncio

from ragllm.config import RedisSettings, RequestLogSettings
from ragllm.redis_link import RedisLink
from ragllm.telemetry.request_log import RequestLog


def test_without_redis_the_log_is_a_ring_and_reports_no_loss():
    dropped: list[int] = []
    log = RequestLog(RequestLogSettings(buffer=10), None, on_drop=dropped.append)
    for index in range(25):
        log.append({"request_id": str(index)})
    assert dropped == [] and [e["request_id"] for e in log._pending] == [
        str(i) for i in range(15, 25)
    ]


async def test_with_redis_away_entries_past_the_buffer_are_counted_as_lost():
    dropped: list[int] = []
    link = RedisLink(
        RedisSettings(url="redis://127.0.0.1:1/0", timeout_s=0.05)
    )  # nothing listens there
    log = RequestLog(RequestLogSettings(buffer=10), link, on_drop=dropped.append)
    for index in range(25):
        log.append({"request_id": str(index)})
    await log.flush()
    assert sum(dropped) == 15 and log.num_pending == 10
    await link.aclose()


async def test_a_batch_sent_again_after_an_ambiguous_failure_is_written_once(shared_redis_url):
    import os

    import redis.asyncio

    from ragllm.redis_link import RedisUnavailable

    prefix = f"ragllm-log-{os.urandom(4).hex()}"
    link = RedisLink(RedisSettings(url=shared_redis_url, prefix=prefix, retry_interval_s=0.05))
    log = RequestLog(RequestLogSettings(), link)
    real_write = log._write

    async def write_then_lose_the_reply(redis_client, batch_id, batch):
        await real_write(redis_client, batch_id, batch)  # it reached Redis...
        raise RedisUnavailable("timed out")  # ...but the reply did not come back

    for index in range(3):
        log.append({"request_id": str(index), "status": 200, "latency_ms": 12.5, "ttft_ms": None})
    log._write = write_then_lose_the_reply
    await log.flush()
    assert log.num_pending == 3  # kept for another try
    log._write = real_write
    await asyncio.sleep(0.1)  # past the link's retry interval after the failure
    await log.flush()
    client = redis.asyncio.Redis.from_url(shared_redis_url, decode_responses=True)
    entries = [fields for _, fields in await client.xrange(f"{prefix}:requests")]
    assert [e["request_id"] for e in entries] == ["0", "1", "2"] and log.num_pending == 0
    assert entries[0] == {"request_id": "0", "status": "200", "latency_ms": "12.5", "ttft_ms": ""}
    await client.aclose()
    await link.aclose()
