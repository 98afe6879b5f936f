"""API keys: from the environment and a key file, their limits and cache groups."""

from __future__ import annotations

import json

import pytest

from ragllm.access.keys import KeyRing, Principal, digest
from ragllm.config import AuthSettings, LimitsSettings
from ragllm.errors import AuthenticationFailed


def test_keys_from_env_and_file_are_checked_and_carry_their_limits(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps([{"id": "svc", "sha256": digest("s3cret").hex(), "rpm": 7, "tpm": 700}])
    )
    ring = KeyRing.from_settings(
        AuthSettings(keys="ops:opskey", keys_file=keys_file), LimitsSettings(rpm=100)
    )
    assert ring.authenticate("Bearer opskey") == Principal("ops", 100, None, cache_group="ops")
    assert ring.authenticate("Bearer s3cret") == Principal("svc", 7, 700, cache_group="svc")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic opskey", "opskey"):
        with pytest.raises(AuthenticationFailed):
            ring.authenticate(header)


def test_keys_are_off_locally_and_required_in_the_cloud_profile():
    anonymous = KeyRing.from_settings(AuthSettings(), LimitsSettings()).authenticate(None)
    assert (
        anonymous.key_id == "anonymous" and anonymous.cache_group is None
    )  # one prefix cache for all
    with pytest.raises(ValueError, match="RAGLLM_AUTH__KEYS"):
        KeyRing.from_settings(AuthSettings(required=True), LimitsSettings())


def test_a_key_file_can_put_keys_in_one_cache_group_and_each_other_key_keeps_its_own(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {"id": "a1", "key": "k1", "cache_group": "team-a"},
                {"id": "a2", "key": "k2", "cache_group": "team-a"},
                {"id": "b", "key": "k3"},
            ]
        )
    )
    ring = KeyRing.from_settings(
        AuthSettings(keys="ops:opskey", keys_file=keys_file), LimitsSettings()
    )
    groups = [
        ring.authenticate(f"Bearer {key}").cache_group for key in ("k1", "k2", "k3", "opskey")
    ]
    assert groups == ["team-a", "team-a", "b", "ops"]


@pytest.mark.parametrize("group", ["", 7, ["team-a"], {"name": "team-a"}, True])
def test_a_cache_group_that_is_not_a_non_empty_string_stops_the_start(tmp_path, group):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"id": "a1", "key": "k1", "cache_group": group}]))
    with pytest.raises(ValueError, match="cache_group"):
        KeyRing.from_settings(AuthSettings(keys_file=keys_file), LimitsSettings())


def test_admin_keys_open_admin_routes_only_and_tenant_keys_never_do():
    from ragllm.errors import PermissionDenied

    ring = KeyRing.from_settings(
        AuthSettings(keys="team:team-key", admin_keys="ops:admin-key"), LimitsSettings()
    )
    assert ring.authenticate_admin("Bearer admin-key") == "ops"
    with pytest.raises(PermissionDenied) as refused:
        ring.authenticate_admin("Bearer team-key")
    assert refused.value.status_code == 403 and refused.value.code == "admin_key_required"
    for header in (None, "", "Bearer", "Basic admin-key", "Bearer wrong"):
        with pytest.raises(AuthenticationFailed):
            ring.authenticate_admin(header)
    with pytest.raises(AuthenticationFailed):  # an admin key cannot generate
        ring.authenticate("Bearer admin-key")


def test_admin_routes_are_refused_with_no_admin_key_configured_whatever_is_sent():
    from ragllm.errors import PermissionDenied

    for auth in (AuthSettings(), AuthSettings(keys="team:team-key")):
        ring = KeyRing.from_settings(auth, LimitsSettings())
        for header in (None, "Bearer team-key", "Bearer anything"):
            with pytest.raises(PermissionDenied, match="RAGLLM_AUTH__ADMIN_KEYS"):
                ring.authenticate_admin(header)


def test_an_admin_key_may_not_share_a_tenants_secret_and_must_be_id_secret():
    with pytest.raises(ValueError, match="admin"):
        KeyRing.from_settings(
            AuthSettings(keys="team:same", admin_keys="ops:same"), LimitsSettings()
        )
    with pytest.raises(ValueError, match="RAGLLM_AUTH__ADMIN_KEYS"):
        KeyRing.from_settings(AuthSettings(admin_keys="no-secret"), LimitsSettings())


def test_cache_groups_are_the_keys_groups_or_the_one_anonymous_group(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {"id": "a1", "key": "k1", "cache_group": "alpha"},
                {"id": "a2", "key": "k2", "cache_group": "alpha"},
                {"id": "beta", "key": "k3"},
            ]
        )
    )
    ring = KeyRing.from_settings(AuthSettings(keys_file=keys_file), LimitsSettings())
    assert ring.cache_groups() == ["alpha", "beta"]
    assert KeyRing.from_settings(AuthSettings(), LimitsSettings()).cache_groups() == [None]
