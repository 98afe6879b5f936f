"""An upstream's error, read into the fields of OpenAI's envelope whatever shape it came in.

vLLM sends ``{"error": {"message", "type", "param", "code": 400}}`` (older versions the same fields
flat, beside ``"object": "error"``); llama.cpp's server and proxies send other shapes, or a bare
string. OpenAI's schema wants ``code`` a string or null, so an integer code (vLLM's, the HTTP
status) is passed on as its digits, and anything else that is not a short string becomes null. The
upstream's message text is kept, bounded: an upstream is not trusted to size what we relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

MAX_MESSAGE_CHARS = 2000  # what the client is told of the upstream's message
MAX_FIELD_CHARS = 200  # type, param and code are identifiers, not prose


@dataclass(frozen=True, slots=True)
class UpstreamErrorFields:
    message: str
    type: str | None  # None: the caller picks one from the status
    param: str | None
    code: str | None


def is_error_event(event: dict[str, Any]) -> bool:
    """An error reported inside an answer: ``{"error": ...}`` or vLLM's older flat ``object: error``."""
    return event.get("error") is not None or event.get("object") == "error"


def error_fields(envelope: Any) -> UpstreamErrorFields:
    """The message, type, param and code of whatever an upstream answered as an error."""
    if isinstance(envelope, dict):
        nested = envelope.get("error")
        error = nested if isinstance(nested, dict) else envelope
        message = nested if isinstance(nested, str) else error.get("message") or error.get("detail")
    else:
        error, message = {}, envelope
    return UpstreamErrorFields(
        message=_text(message if message is not None else envelope, MAX_MESSAGE_CHARS)
        or "the upstream failed",
        type=_identifier(error.get("type")),
        param=_identifier(error.get("param")),
        code=_code(error.get("code")),
    )


def _code(value: Any) -> str | None:
    if isinstance(value, bool):  # a bool is an int to Python, never a code to anyone
        return None
    if isinstance(value, int):
        return str(value) if abs(value) < 10**6 else None
    return _identifier(value)


def _identifier(value: Any) -> str | None:
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) and value else None


def _text(value: Any, limit: int) -> str:
    if isinstance(value, str):
        return value[:limit]
    try:  # a message that is no string (a list, an object): shown as the JSON it came as
        return orjson.dumps(value)[:limit].decode(errors="ignore")
    except (orjson.JSONEncodeError, TypeError):  # nested past orjson's depth, or not JSON at all
        return f"the upstream sent an error message of type {type(value).__name__}"
