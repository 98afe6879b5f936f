"""The one place where exceptions become OpenAI error envelopes."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from ragllm.errors import RagLLMError

logger = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_HTTP_ERROR_CODES = {413: "request_too_large"}


def error_response(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


async def _service_error(request: Request, exc: RagLLMError) -> Response:
    headers = dict(exc.headers or {})
    if exc.retry_after_s is not None:
        headers.setdefault("retry-after", str(exc.retry_after_s))
    return error_response(
        exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return error_response(
            400, "the request body is not valid JSON", "invalid_request_error", code="invalid_json"
        )
    param = _param_path(first.get("loc", ()))
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first.get("type") == "missing":
        message = f"{param} is required"
    return error_response(400, message, "invalid_request_error", param, code="invalid_value")


_UNION_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})


def _param_path(location: tuple) -> str | None:
    """``("body", "stop", "str")`` → ``"stop"``: the field path, without pydantic's union-member tags."""
    parts: list[str] = []
    for part in location:
        text = str(part)
        if text == "body" and not parts:
            continue
        if text in _UNION_MEMBER_TAGS or "[" in text or text[:1].isupper():
            break
        parts.append(text)
    return ".".join(parts) or None


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return http_error_response(exc)


def http_error_response(exc: HTTPException) -> Response:
    """Starlette's and FastAPI's HTTP errors (and our own raised as such) in OpenAI's envelope."""
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
    if exc.status_code == 400:  # FastAPI's body parser: undecodable bytes (invalid UTF-8, ...)
        return error_response(
            400,
            f"the request body could not be parsed: {exc.detail}",
            error_type,
            code="invalid_body",
        )
    return error_response(
        exc.status_code,
        str(exc.detail),
        error_type,
        code=_HTTP_ERROR_CODES.get(exc.status_code),
        headers=exc.headers,
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal server error", "server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RagLLMError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
