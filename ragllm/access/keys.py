"""API keys: who is asking, and the limits and cache group that come with the key.

Keys are kept as SHA-256 digests and compared in constant time. Each key belongs to a cache group
(its own id unless the key file names one): only requests of one group share prefix-cache blocks,
so no tenant can learn from a cache hit what another sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragllm.config import AuthSettings, LimitsSettings
from ragllm.errors import AuthenticationFailed

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    digest: bytes
    rpm: int | None = None
    tpm: int | None = None
    cache_group: str | None = (
        None  # keys naming one group share a prefix cache; None: the key's own
    )


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
    def from_settings(cls, auth: AuthSettings, limits: LimitsSettings) -> KeyRing:
        keys = _keys_from_env(auth.keys.get_secret_value()) if auth.keys else []
        if auth.keys_file:
            keys += _keys_from_file(auth.keys_file)
        if auth.required and not keys:
            raise ValueError(
                "API keys are required (auth.required) but none are configured: set "
                "RAGLLM_AUTH__KEYS=id:secret[,...] or RAGLLM_AUTH__KEYS_FILE"
            )
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
        return Principal(
            match.key_id,
            match.rpm or self._limits.rpm,
            match.tpm or self._limits.tpm,
            match.cache_group or match.key_id,
        )


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
        keys.append(
            ApiKey(item["id"], key_digest, item.get("rpm"), item.get("tpm"), _cache_group(item))
        )
    return keys


def _cache_group(item: dict[str, Any]) -> str | None:
    group = item.get("cache_group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ValueError(f"key {item.get('id')!r}: cache_group must be a non-empty string")
    return group
