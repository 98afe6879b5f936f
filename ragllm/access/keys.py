"""API keys: who is asking, and the limits and cache group that come with the key.

Keys are kept as SHA-256 digests and compared in constant time. Each key belongs to a cache group
(its own id unless the key file names one): only requests of one group share prefix-cache blocks,
so no tenant can learn from a cache hit what another sent.

Admin keys (``auth.admin_keys``) are a separate set: they open the ``/admin`` routes and nothing
else, and a tenant's key never opens those. With none configured the admin routes are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragllm.config import AuthSettings, LimitsSettings
from ragllm.errors import AuthenticationFailed, PermissionDenied

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
    def __init__(
        self,
        keys: list[ApiKey],
        required: bool,
        limits: LimitsSettings,
        admin_keys: list[ApiKey] | None = None,
    ) -> None:
        self._keys = keys
        self.required = required
        self._limits = limits
        self._admin_keys = admin_keys or []

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
        admin_keys = (
            _keys_from_env(auth.admin_keys.get_secret_value(), "RAGLLM_AUTH__ADMIN_KEYS")
            if auth.admin_keys
            else []
        )
        if any(_matching(admin.digest, keys) for admin in admin_keys):
            raise ValueError("an admin key's secret is also an API key's: give admins their own")
        return cls(keys, auth.required or bool(keys), limits, admin_keys)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.required:
            return Principal(ANONYMOUS, self._limits.rpm, self._limits.tpm)
        secret = _bearer(authorization)
        if secret is None:
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
        match = _matching(digest(secret), self._keys)
        if match is None:
            raise AuthenticationFailed("incorrect API key provided")
        return Principal(
            match.key_id,
            match.rpm or self._limits.rpm,
            match.tpm or self._limits.tpm,
            match.cache_group or match.key_id,
        )

    def authenticate_admin(self, authorization: str | None) -> str:
        """The admin key's id; 403 with no admin key configured or for a tenant's key, 401 for a
        missing or unknown one."""
        if not self._admin_keys:
            raise PermissionDenied(
                "admin routes are disabled: no admin key is configured (RAGLLM_AUTH__ADMIN_KEYS)",
                code="admin_disabled",
            )
        secret = _bearer(authorization)
        if secret is None:
            raise AuthenticationFailed("missing admin key: send 'Authorization: Bearer <key>'")
        presented = digest(secret)
        admin = _matching(presented, self._admin_keys)
        if admin is not None:
            return admin.key_id
        if _matching(presented, self._keys) is not None:
            raise PermissionDenied(
                "this API key is not an admin key; admin routes take one of RAGLLM_AUTH__ADMIN_KEYS",
                code="admin_key_required",
            )
        raise AuthenticationFailed("incorrect API key provided")

    def cache_groups(self) -> list[str | None]:
        """Every cache group a request can belong to: each key's (its own id unless it names one),
        or the single group of anonymous requests (None) when keys are off."""
        if not self.required:
            return [None]
        return sorted({key.cache_group or key.key_id for key in self._keys})


def _matching(presented: bytes, keys: list[ApiKey]) -> ApiKey | None:
    match = None
    for key in keys:  # compare against every key, always: no early exit to time
        if hmac.compare_digest(presented, key.digest):
            match = key
    return match


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _keys_from_env(spec: str, name: str = "RAGLLM_AUTH__KEYS") -> list[ApiKey]:
    keys = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key_id, sep, secret = item.partition(":")
        if not sep or not secret:
            raise ValueError(f"{name} entries are id:secret")
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
