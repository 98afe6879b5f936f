"""Rate limits, against a real Redis and in the per-process fallback."""

from __future__ import annotations

import uuid

import pytest

from ragllm.access.keys import Principal
from ragllm.access.rate_limits import RateLimiter
from ragllm.config import RedisSettings
from ragllm.errors import RateLimited
from ragllm.redis_link import RedisLink
from tests.support.servers import wait_clear_of_window_edge


@pytest.mark.parametrize("with_redis", [True, False])
async def test_token_budget_stops_requests_once_spent(shared_redis_url, with_redis):
    link = (
        RedisLink(RedisSettings(url=shared_redis_url, prefix=f"test-{uuid.uuid4().hex}"))
        if with_redis
        else None
    )
    limiter = RateLimiter(link)
    principal = Principal("k", rpm=None, tpm=100)
    wait_clear_of_window_edge()
    allowance = await limiter.admit(principal)
    assert allowance.headers()["x-ratelimit-remaining-tokens"] == "100"
    await limiter.spend(principal, 150)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(principal)
    assert caught.value.error_type == "tokens"
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 1 <= int(caught.value.headers["retry-after"]) <= 60
    if link is not None:
        await link.aclose()


async def test_requests_fall_back_to_per_process_counting_when_redis_is_down():
    link = RedisLink(RedisSettings(url="redis://127.0.0.1:1/0", timeout_s=0.05))
    limiter = RateLimiter(link)
    principal = Principal("k", rpm=2, tpm=None)
    wait_clear_of_window_edge()
    await limiter.admit(principal)
    await limiter.admit(principal)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(principal)
    assert caught.value.error_type == "requests"
    await link.aclose()
