"""The admin routes: operators' calls, opened by an admin key only (``auth.admin_keys``).

An admin route authenticates its caller before reading a byte of the body, reads at most
``MAX_ADMIN_BODY_BYTES``, and is neither rate-limited nor billed as generation: it does no engine
work, and only an operator can call it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import request_response

from ragllm.api.body import parsed_body
from ragllm.api.body_limit import declared_length
from ragllm.api.deps import app_state
from ragllm.cache.index import document_index
from ragllm.errors import ClientClosedRequest, InvalidRequest, RequestTooLarge
from ragllm.protocol.admin import CacheInvalidation, CacheInvalidationResult
from ragllm.protocol.openai import ErrorResponse

logger = logging.getLogger(__name__)

# 1,024 ids of 128 characters, JSON-quoted, fit with room to spare.
MAX_ADMIN_BODY_BYTES = 256 * 1024
# Document indexes (ids × cache groups) one invalidation may touch.
MAX_INDEXES_PER_CALL = 65_536
ENDPOINT_PARAMETERS = ("body", "request", "admin")


async def admin_key(request: Request) -> str:
    """The admin key's id: 403 for a tenant's key or with no admin key configured, 401 without one."""
    return app_state(request).keys.authenticate_admin(request.headers.get("authorization"))


class AdminRoute(APIRoute):
    """A route whose endpoint is ``endpoint(body: Model, request: Request, admin: str =
    Depends(admin_key))``: FastAPI documents it from that signature; the route authenticates the
    admin first, then reads the bounded body and parses it into ``Model``."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        parameters = tuple(inspect.signature(endpoint).parameters)
        if parameters != ENDPOINT_PARAMETERS:
            raise TypeError(
                f"{endpoint.__name__} takes {parameters}; an admin endpoint takes {ENDPOINT_PARAMETERS}"
            )
        super().__init__(path, endpoint, **kwargs)
        self.app = request_response(self.get_route_handler())

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint, body_model = self.endpoint, self.dependant.body_params[0].field_info.annotation

        async def handle(request: Request) -> Response:
            admin = await admin_key(request)
            raw = await _bounded_body(request)
            body = await parsed_body(raw, body_model, app_state(request).settings.input)
            return await endpoint(body, request, admin)

        return handle


router = APIRouter(route_class=AdminRoute)
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 413, 503)}


@router.post(
    "/admin/cache/invalidate",
    response_model=CacheInvalidationResult,
    responses=_ERRORS,
    description="Admin key only. Evicts every cached answer that used any of the documents (those "
    "packed into its prompt), in the named cache group or in all of them.",
)
async def invalidate_cache(
    body: CacheInvalidation, request: Request, admin: str = Depends(admin_key)
) -> Response:
    state = app_state(request)
    groups = _groups(state.keys.cache_groups(), body.cache_group)
    document_ids = list(dict.fromkeys(body.document_ids))
    if len(document_ids) * len(groups) > MAX_INDEXES_PER_CALL:
        raise InvalidRequest(
            f"{len(document_ids)} documents in {len(groups)} cache groups are more than "
            f"{MAX_INDEXES_PER_CALL} indexes in one call: name a cache_group or send fewer ids",
            param="document_ids",
        )
    indexes = [document_index(group, id_) for group in groups for id_ in document_ids]
    evicted = await state.cache.invalidate(indexes)
    logger.info(
        "cache invalidated",
        extra={
            "fields": {
                "admin": admin,
                "documents": len(document_ids),
                "cache_group": body.cache_group,
                "evicted": evicted,
            }
        },
    )
    result = CacheInvalidationResult(
        evicted=evicted, document_ids=len(document_ids), cache_groups=len(groups)
    )
    return Response(orjson.dumps(result.model_dump()), media_type="application/json")


def _groups(known: list[str | None], named: str | None) -> list[str | None]:
    """The cache groups an invalidation covers: the named one, or all of them."""
    if named is None:
        return known
    if known == [None]:
        raise InvalidRequest(
            "API keys are off, so every request shares one cache group: omit cache_group",
            param="cache_group",
        )
    if named not in known:
        raise InvalidRequest(
            f"no API key has the cache group {named!r}", param="cache_group", code="unknown_group"
        )
    return [named]


async def _bounded_body(request: Request) -> bytes:
    """The body, refused (413) the moment it passes ``MAX_ADMIN_BODY_BYTES``."""
    declared = declared_length(request.scope)
    if declared is not None and declared > MAX_ADMIN_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_ADMIN_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosedRequest(
            "the client closed the connection before its request body was read"
        ) from None
    return b"".join(chunks)


def _too_large() -> RequestTooLarge:
    return RequestTooLarge(f"an admin request body is at most {MAX_ADMIN_BODY_BYTES} bytes")
