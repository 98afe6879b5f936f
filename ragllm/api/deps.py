"""Route dependencies."""

from __future__ import annotations

from fastapi import Request

from ragllm.access.keys import Principal
from ragllm.api.record import SCOPE_KEY, RequestRecord
from ragllm.api.state import AppState
from ragllm.telemetry.tracing import child_span


def app_state(request: Request) -> AppState:
    return request.app.state.ragllm


def record_of(request: Request) -> RequestRecord | None:
    return request.scope.get(SCOPE_KEY)


async def authenticated(request: Request) -> Principal:
    """The caller's identity; raises 401 when keys are required and none (or a wrong one) is sent.

    Async on purpose: FastAPI runs a plain ``def`` dependency on a worker thread, a hop per request."""
    record = record_of(request)
    with child_span(record.span if record else None, "auth"):
        principal = app_state(request).keys.authenticate(request.headers.get("authorization"))
    if record is not None:
        record.principal = principal
    return principal
