"""Request bodies: raw bytes to a validated wire model, errors shaped as FastAPI reports them.

Small bodies (nearly all) are decoded on the event loop. A large one is decoded, bounded and
validated on a worker thread, its documents in slices: every C call that holds the GIL (JSON
parsing, one slice's validation) stays short, so the loop keeps answering others, /health included.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, TypeVar

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

from ragllm.bounded_json import JsonLimits, check_structure
from ragllm.config import InputSettings
from ragllm.protocol.openai import FAIL_FAST
from ragllm.rag.contract import RagDocument
from ragllm.serving.bounds import check_raw

BaseModelT = TypeVar("BaseModelT", bound=BaseModel)
LARGE_BODY_BYTES = 256 * 1024
DOCUMENT_SLICE = 512
_DOCUMENTS = TypeAdapter(Annotated[list[RagDocument], FAIL_FAST])


async def parsed_body(raw: bytes, model: type[BaseModelT], bounds: InputSettings) -> BaseModelT:
    if len(raw) < LARGE_BODY_BYTES:
        return _parse(raw, model, bounds)
    return await asyncio.to_thread(_parse, raw, model, bounds)


def _parse(raw: bytes, model: type[BaseModelT], bounds: InputSettings) -> BaseModelT:
    body = _decoded(raw)
    check_structure(body, JsonLimits.body(bounds))  # before anything may recurse over it
    check_raw(body, bounds)
    return _validated(model, body)


def _decoded(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if raw and _not_utf8(raw):
            raise HTTPException(400, "invalid UTF-8 in the request body") from exc
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": str(exc)}]
        ) from exc


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


def _validated(model: type[BaseModelT], body: Any) -> BaseModelT:
    try:
        documents = body.get("documents") if isinstance(body, dict) else None
        if isinstance(documents, list) and len(documents) > DOCUMENT_SLICE:
            # Validated instances are taken as they are by the model's own validation.
            body = {**body, "documents": _sliced_documents(documents)}
        return model.model_validate(body)
    except ValidationError as exc:
        raise _request_error(exc) from exc


def _sliced_documents(documents: list[Any]) -> list[RagDocument]:
    validated: list[RagDocument] = []
    for start in range(0, len(documents), DOCUMENT_SLICE):
        try:
            validated += _DOCUMENTS.validate_python(documents[start : start + DOCUMENT_SLICE])
        except ValidationError as exc:
            errors = [
                {**e, "loc": ("body", "documents", e["loc"][0] + start, *e["loc"][1:])}
                for e in exc.errors(include_url=False)
            ]
            raise RequestValidationError(errors) from exc
    return validated


def _request_error(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(
        [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
    )
