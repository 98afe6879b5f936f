"""API keys and per-key rate limits (requests and tokens per minute).

Keys are kept as SHA-256 digests and compared in constant time. Each key belongs to a cache group
(its own id unless the key file names one): only requests of one group share prefix-cache blocks,
so no tenant can learn from a cache hit what another sent. Limits are fixed one-minute windows
counted in Redis by one Lua script (check and count in one atomic step), so every replica sharing a
Redis enforces one global limit; without Redis, or while it is away, each process counts alone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragllm.config import AuthSettings, LimitsSettings
from ragllm.errors import AuthenticationFailed, RateLimited
from ragllm.redis_link import RedisLink, RedisUnavailable

WINDOW_S = 60
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    digest: bytes
    rpm: int | None = None
    tpm: int | None = None
    cache_group: str | None = None  # keys naming one group share a prefix cache; None: the key's own


@dataclass(frozen=True)
class Principal:
    """Who is asking: the key's id (never the key), the limits that apply, and the cache group whose
    prefix-cache blocks its requests may share (None with keys off: one group for all)."""

    key_id: str
    rpm: int | None
    tpm: int | None
    cache_group: str | None = None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyRing:
    def __init__(self, keys: list[ApiKey], required: bool, limits: LimitsSettings) -> None:
        self._keys = keys
        self.required = required
        self._limits = limits

    @classmethod
    def from_settings(cls, auth: AuthSettings, limits: LimitsSettings) -> "KeyRing":
        keys = _keys_from_env(auth.keys.get_secret_value()) if auth.keys else []
        if auth.keys_file:
            keys += _keys_from_file(auth.keys_file)
        if auth.required and not keys:
            raise ValueError("API keys are required (auth.required) but none are configured: set "
                             "RAGLLM_AUTH__KEYS=id:secret[,...] or RAGLLM_AUTH__KEYS_FILE")
        return cls(keys, auth.required or bool(keys), limits)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.required:
            return Principal(ANONYMOUS, self._limits.rpm, self._limits.tpm)
        secret = _bearer(authorization)
        if secret is None:
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
        presented = digest(secret)
        match = None
        for key in self._keys:  # compare against every key, always: no early exit to time
            if hmac.compare_digest(presented, key.digest):
                match = key
        if match is None:
            raise AuthenticationFailed("incorrect API key provided")
        return Principal(match.key_id, match.rpm or self._limits.rpm, match.tpm or self._limits.tpm,
                         match.cache_group or match.key_id)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _keys_from_env(spec: str) -> list[ApiKey]:
    keys = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key_id, sep, secret = item.partition(":")
        if not sep or not secret:
            raise ValueError("RAGLLM_AUTH__KEYS entries are id:secret")
        keys.append(ApiKey(key_id, digest(secret)))
    return keys


def _keys_from_file(path: Path) -> list[ApiKey]:
    keys = []
    for item in json.loads(Path(path).read_text()):
        if "sha256" in item:
            key_digest = bytes.fromhex(item["sha256"])
        else:
            key_digest = digest(item["key"])
        keys.append(ApiKey(item["id"], key_digest, item.get("rpm"), item.get("tpm"), _cache_group(item)))
    return keys


def _cache_group(item: dict[str, Any]) -> str | None:
    group = item.get("cache_group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ValueError(f"key {item.get('id')!r}: cache_group must be a non-empty string")
    return group


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
            raise RateLimited(f"rate limit reached for {kind} per minute (limit {limit}); "
                              f"retry in {max(1, round(reset_s))}s", error_type=kind, headers=headers)
        return allowance

    async def spend(self, principal: Principal, num_tokens: int) -> None:
        if not principal.tpm or num_tokens <= 0:
            return
        window, _ = _window()
        _, token_key = self._keys(principal.key_id, window)
        if self._link is not None:
            try:
                await self._link.call("rate_limit", lambda redis: self._spend_script(
                    keys=[token_key], args=[num_tokens, 2 * WINDOW_S * 1000], client=redis))
                return
            except RedisUnavailable:
                pass
        self._local[token_key] = self._local.get(token_key, 0) + num_tokens

    async def _admit(self, request_key: str, token_key: str, principal: Principal) -> tuple[bool, int, int]:
        if self._link is not None:
            try:
                result = await self._link.call("rate_limit", lambda redis: self._admit_script(
                    keys=[request_key, token_key],
                    args=[principal.rpm or 0, principal.tpm or 0, 2 * WINDOW_S * 1000], client=redis))
                return bool(result[0]), int(result[1]), int(result[2])
            except RedisUnavailable:
                pass
        return self._admit_locally(request_key, token_key, principal)

    def _admit_locally(self, request_key: str, token_key: str, principal: Principal) -> tuple[bool, int, int]:
        self._forget_old_windows()
        requests, tokens = self._local.get(request_key, 0), self._local.get(token_key, 0)
        if (principal.rpm and requests >= principal.rpm) or (principal.tpm and tokens >= principal.tpm):
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
