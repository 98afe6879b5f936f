"""Route dependencies."""

from __future__ import annotations

from fastapi import Request

from ragllm.api.record import SCOPE_KEY, RequestRecord
from ragllm.api.state import AppState
from ragllm.limits import Principal


def app_state(request: Request) -> AppState:
    return request.app.state.ragllm


def record_of(request: Request) -> RequestRecord | None:
    return request.scope.get(SCOPE_KEY)


def authenticated(request: Request) -> Principal:
    """The caller's identity; raises 401 when keys are required and none (or a wrong one) is sent."""
    principal = app_state(request).keys.authenticate(request.headers.get("authorization"))
    record = record_of(request)
    if record is not None:
        record.principal = principal
    return principal
