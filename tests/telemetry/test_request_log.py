"""The request log counts a drop only when an entry is really lost."""

from __future__ import annotations

from ragllm.config import RedisSettings, RequestLogSettings
from ragllm.redis_link import RedisLink
from ragllm.telemetry.request_log import RequestLog


def test_without_redis_the_log_is_a_ring_and_reports_no_loss():
    dropped: list[int] = []
    log = RequestLog(RequestLogSettings(buffer=10), None, on_drop=dropped.append)
    for index in range(25):
        log.append({"request_id": str(index)})
    assert dropped == [] and [e["request_id"] for e in log._pending] == [str(i) for i in range(15, 25)]


async def test_with_redis_away_entries_past_the_buffer_are_counted_as_lost():
    dropped: list[int] = []
    link = RedisLink(RedisSettings(url="redis://127.0.0.1:1/0", timeout_s=0.05))  # nothing listens there
    log = RequestLog(RequestLogSettings(buffer=10), link, on_drop=dropped.append)
    for index in range(25):
        log.append({"request_id": str(index)})
    await log.flush()
    assert sum(dropped) == 15 and log.num_pending == 10
    await link.aclose()
