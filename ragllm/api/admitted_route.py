"""POST endpoints whose caller is authenticated and admitted before a byte of the body is parsed.

FastAPI documents such an endpoint from its signature, as any route's; a request is served without
FastAPI's per-request dependency solving and body re-validation, which cost a gateway about a fifth of
its CPU per request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import request_response

from ragllm.access.keys import Principal
from ragllm.access.rate_limits import Allowance
from ragllm.api.body import parsed_body
from ragllm.api.deps import app_state, authenticated, record_of
from ragllm.errors import ClientClosedRequest, RateLimited, ShuttingDown
from ragllm.telemetry.tracing import child_span

# What an admitted endpoint is called with, in this order.
ENDPOINT_PARAMETERS = ("body", "request", "principal", "allowance")


async def admitted(
    request: Request, principal: Principal = Depends(authenticated)
) -> Allowance | None:
    """Refused while draining; counted against the caller's rate limit."""
    state = app_state(request)
    if state.lifecycle.draining:
        raise ShuttingDown(
            f"the server is shutting down ({state.lifecycle.reason}); retry on another replica"
        )
    try:
        with child_span(record_of(request).span, "rate_limit"):
            return await state.limiter.admit(principal)
    except RateLimited as exc:
        state.metrics.rate_limited.labels(exc.error_type).inc()
        raise


class AdmittedRoute(APIRoute):
    """A route whose endpoint is declared as ``endpoint(body: Model, request: Request, principal =
    Depends(authenticated), allowance = Depends(admitted))``: FastAPI reads that signature for the
    OpenAPI entry, and the route supplies the arguments itself, in its own order: the caller is
    authenticated, admitted (drain check, rate limit), and only then is the body read and parsed
    into ``Model`` (``parsed_body``: bounded, validated once)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        parameters = tuple(inspect.signature(endpoint).parameters)
        if parameters != ENDPOINT_PARAMETERS:
            raise TypeError(
                f"{endpoint.__name__} takes {parameters}; an admitted endpoint takes {ENDPOINT_PARAMETERS}"
            )
        super().__init__(path, endpoint, **kwargs)
        # Starlette's own request/response wrapper: FastAPI's adds exit stacks for dependencies, none here.
        self.app = request_response(self.get_route_handler())

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint, body_model = self.endpoint, self.dependant.body_params[0].field_info.annotation

        async def handle(request: Request) -> Response:
            principal = await authenticated(request)
            allowance = await admitted(request, principal)
            body = await parsed_body(
                await _body(request), body_model, app_state(request).settings.input
            )
            return await endpoint(body, request, principal, allowance)

        return handle


async def _body(request: Request) -> bytes:
    """The request's bytes; a client that leaves mid-upload is a 499, as one that leaves later is
    (one request-log line, no traceback: any client can do it, at will)."""
    try:
        return await request.body()
    except ClientDisconnect:
        record = record_of(request)
        if record is not None:
            record.client_left(app_state(request).metrics)
        raise ClientClosedRequest(
            "the client closed the connection before its request body was read"
        ) from None
