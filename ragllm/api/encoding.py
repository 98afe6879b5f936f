"""OpenAI response bodies and SSE events as bytes.

Streaming is the hot path: every event of a request shares the same JSON around its text, so that
JSON is rendered once per request and each event only encodes its text (one ``orjson.dumps``).
"""

from __future__ import annotations

import orjson

from ragllm.engines.base import Delta
from ragllm.service import Outcome, PreparedRequest

DONE_EVENT = b"data: [DONE]\n\n"


def _usage(last: Delta) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


def _head(prepared: PreparedRequest, object_name: str) -> dict:
    return {
        "id": prepared.id,
        "object": object_name,
        "created": prepared.created,
        "model": prepared.model.id,
        "system_fingerprint": prepared.model.fingerprint,
    }


def full_response(prepared: PreparedRequest, outcome: Outcome, extra: dict | None = None) -> bytes:
    """The non-streaming body for a chat or text completion; ``extra`` adds top-level extension fields."""
    reason = outcome.last.finish_reason.value
    if prepared.kind == "chat":
        body = _head(prepared, "chat.completion")
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text},
                  "logprobs": None, "finish_reason": reason}
    else:
        body = _head(prepared, "text_completion")
        choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": reason}
    body["choices"] = [choice]
    body["usage"] = _usage(outcome.last)
    if extra:
        body.update(extra)
    return orjson.dumps(body)


def error_event(envelope: dict) -> bytes:
    return b"data: " + orjson.dumps(envelope) + b"\n\n"


class ChunkEncoder:
    """Renders one request's stream events."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self._prepared = prepared
        self._chat = prepared.kind == "chat"
        head = _head(prepared, "chat.completion.chunk" if self._chat else "text_completion")
        if prepared.include_usage:
            head["usage"] = None  # OpenAI: every chunk but the last carries "usage": null
        self._head = head
        # Split a rendered template chunk around a marker to get the bytes before and after the text.
        marker = "\x00TEXT\x00"
        rendered = self._render(marker, None)
        before, after = rendered.split(orjson.dumps(marker))
        self._text_prefix, self._text_suffix = before, after

    def _render(self, text: str | None, finish_reason: str | None, extra: dict | None = None) -> bytes:
        if self._chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice], **(extra or {})}) + b"\n\n"

    def opening(self) -> bytes | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if not self._chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice]}) + b"\n\n"

    def text(self, text: str) -> bytes:
        return self._text_prefix + orjson.dumps(text) + self._text_suffix

    def closing(self, last: Delta, extra: dict | None = None) -> bytes:
        """The finish-reason event (with ``extra`` fields), then the usage event if asked for."""
        events = self._render(None, last.finish_reason.value, extra)
        if self._prepared.include_usage:
            usage = {**self._head, "choices": [], "usage": _usage(last)}
            events += b"data: " + orjson.dumps(usage) + b"\n\n"
        return events + DONE_EVENT
