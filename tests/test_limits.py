"""API keys and rate limits, against a real Redis and in the per-process fallback."""

from __future__ import annotations

import json
import uuid

import pytest

from ragllm.config import AuthSettings, LimitsSettings, RedisSettings
from ragllm.errors import AuthenticationFailed, RateLimited
from ragllm.limits import KeyRing, Principal, RateLimiter, digest
from ragllm.redis_link import RedisLink
from tests.servers import wait_clear_of_window_edge


def test_keys_from_env_and_file_are_checked_and_carry_their_limits(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"id": "svc", "sha256": digest("s3cret").hex(), "rpm": 7, "tpm": 700}]))
    ring = KeyRing.from_settings(AuthSettings(keys="ops:opskey", keys_file=keys_file), LimitsSettings(rpm=100))
    assert ring.authenticate("Bearer opskey") == Principal("ops", 100, None, cache_group="ops")
    assert ring.authenticate("Bearer s3cret") == Principal("svc", 7, 700, cache_group="svc")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic opskey", "opskey"):
        with pytest.raises(AuthenticationFailed):
            ring.authenticate(header)


def test_keys_are_off_locally_and_required_in_the_cloud_profile():
    anonymous = KeyRing.from_settings(AuthSettings(), LimitsSettings()).authenticate(None)
    assert anonymous.key_id == "anonymous" and anonymous.cache_group is None  # one prefix cache for all
    with pytest.raises(ValueError, match="RAGLLM_AUTH__KEYS"):
        KeyRing.from_settings(AuthSettings(required=True), LimitsSettings())


def test_a_key_file_can_put_keys_in_one_cache_group_and_each_other_key_keeps_its_own(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"id": "a1", "key": "k1", "cache_group": "team-a"},
                                     {"id": "a2", "key": "k2", "cache_group": "team-a"}, {"id": "b", "key": "k3"}]))
    ring = KeyRing.from_settings(AuthSettings(keys="ops:opskey", keys_file=keys_file), LimitsSettings())
    groups = [ring.authenticate(f"Bearer {key}").cache_group for key in ("k1", "k2", "k3", "opskey")]
    assert groups == ["team-a", "team-a", "b", "ops"]


@pytest.mark.parametrize("group", ["", 7, ["team-a"], {"name": "team-a"}, True])
def test_a_cache_group_that_is_not_a_non_empty_string_stops_the_start(tmp_path, group):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"id": "a1", "key": "k1", "cache_group": group}]))
    with pytest.raises(ValueError, match="cache_group"):
        KeyRing.from_settings(AuthSettings(keys_file=keys_file), LimitsSettings())


@pytest.mark.parametrize("with_redis", [True, False])
async def test_token_budget_stops_requests_once_spent(shared_redis_url, with_redis):
    link = RedisLink(RedisSettings(url=shared_redis_url, prefix=f"test-{uuid.uuid4().hex}")) if with_redis else None
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
