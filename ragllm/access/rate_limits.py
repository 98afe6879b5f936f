"""Per-key rate limits: requests and tokens per minute.

Limits are fixed one-minute windows counted in Redis by one Lua script (check and count in one
atomic step), so every replica sharing a Redis enforces one global limit; without Redis, or while it
is away, each process counts alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ragllm.access.keys import Principal
from ragllm.errors import RateLimited
from ragllm.redis_link import RedisLink, RedisUnavailable

WINDOW_S = 60


@dataclass(frozen=True)
class Allowance:
    """The state of a principal's windows after admission; rendered as OpenAI's x-ratelimit headers."""

    rpm: int | None
    tpm: int | None
    requests_used: int
    tokens_used: int
    reset_s: float

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        reset = f"{max(self.reset_s, 0.0):.0f}s"
        if self.rpm:
            headers["x-ratelimit-limit-requests"] = str(self.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, self.rpm - self.requests_used))
            headers["x-ratelimit-reset-requests"] = reset
        if self.tpm:
            headers["x-ratelimit-limit-tokens"] = str(self.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, self.tpm - self.tokens_used))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers


# KEYS: request counter, token counter. ARGV: rpm (0 = none), tpm (0 = none), window ms.
# Refuses without counting when either window is spent; otherwise counts the request.
_ADMIT_LUA = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if (rpm > 0 and requests >= rpm) or (tpm > 0 and tokens >= tpm) then
  return {0, requests, tokens}
end
requests = redis.call('INCR', KEYS[1])
if requests == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {1, requests, tokens}
"""

_SPEND_LUA = """
local tokens = redis.call('INCRBY', KEYS[1], ARGV[1])
if tokens == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return tokens
"""


class RateLimiter:
    """Admits requests against per-minute windows; ``spend`` records tokens once they are known."""

    def __init__(self, link: RedisLink | None) -> None:
        self._link = link
        self._local: dict[str, int] = {}  # per-process windows: with no Redis, or while it is away
        self._admit_script: Any = None
        self._spend_script: Any = None
        if link is not None:
            self._admit_script = link.client.register_script(_ADMIT_LUA)
            self._spend_script = link.client.register_script(_SPEND_LUA)

    async def admit(self, principal: Principal) -> Allowance | None:
        if not principal.rpm and not principal.tpm:
            return None
        window, reset_s = _window()
        request_key, token_key = self._keys(principal.key_id, window)
        allowed, requests, tokens = await self._admit(request_key, token_key, principal)
        allowance = Allowance(principal.rpm, principal.tpm, requests, tokens, reset_s)
        if not allowed:
            spent_tokens = bool(principal.tpm and tokens >= principal.tpm)
            kind = "tokens" if spent_tokens else "requests"
            limit = principal.tpm if spent_tokens else principal.rpm
            headers = {**allowance.headers(), "retry-after": str(max(1, round(reset_s)))}
            raise RateLimited(
                f"rate limit reached for {kind} per minute (limit {limit}); "
                f"retry in {max(1, round(reset_s))}s",
                error_type=kind,
                headers=headers,
            )
        return allowance

    async def spend(self, principal: Principal, num_tokens: int) -> None:
        if not principal.tpm or num_tokens <= 0:
            return
        window, _ = _window()
        _, token_key = self._keys(principal.key_id, window)
        if self._link is not None:
            try:
                await self._link.call(
                    "rate_limit",
                    lambda redis: self._spend_script(
                        keys=[token_key], args=[num_tokens, 2 * WINDOW_S * 1000], client=redis
                    ),
                )
                return
            except RedisUnavailable:
                pass
        self._local[token_key] = self._local.get(token_key, 0) + num_tokens

    async def _admit(
        self, request_key: str, token_key: str, principal: Principal
    ) -> tuple[bool, int, int]:
        if self._link is not None:
            try:
                result = await self._link.call(
                    "rate_limit",
                    lambda redis: self._admit_script(
                        keys=[request_key, token_key],
                        args=[principal.rpm or 0, principal.tpm or 0, 2 * WINDOW_S * 1000],
                        client=redis,
                    ),
                )
                return bool(result[0]), int(result[1]), int(result[2])
            except RedisUnavailable:
                pass
        return self._admit_locally(request_key, token_key, principal)

    def _admit_locally(
        self, request_key: str, token_key: str, principal: Principal
    ) -> tuple[bool, int, int]:
        self._forget_old_windows()
        requests, tokens = self._local.get(request_key, 0), self._local.get(token_key, 0)
        if (principal.rpm and requests >= principal.rpm) or (
            principal.tpm and tokens >= principal.tpm
        ):
            return False, requests, tokens
        self._local[request_key] = requests + 1
        return True, requests + 1, tokens

    def _forget_old_windows(self) -> None:
        current, _ = _window()
        suffix = f":{current}:"
        for key in [k for k in self._local if suffix not in k]:
            del self._local[key]

    def _keys(self, key_id: str, window: int) -> tuple[str, str]:
        base = f"ratelimit:{key_id}:{window}:"
        if self._link is not None:
            base = self._link.key(base)
        return base + "requests", base + "tokens"


def _window() -> tuple[int, float]:
    now = time.time()
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now
