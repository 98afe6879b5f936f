"""OpenAI response bodies and SSE events as bytes.

Streaming is the hot path: every event of a request shares the same JSON around its text, so that
JSON is rendered once per request and each event only encodes its text (one ``orjson.dumps``).
"""

from __future__ import annotations

import orjson

from ragllm.engines.base import Delta, TokenLogprob
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


def _wants_logprobs(prepared: PreparedRequest) -> bool:
    return prepared.generation.params.logprobs is not None


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat ``logprobs``: one entry a token, with its UTF-8 bytes and top alternatives."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                         "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(token.encode())}
                                          for token, logprob in e.top]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """The completions API's (legacy) ``logprobs``: parallel lists, offsets into the completion's text."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def full_response(prepared: PreparedRequest, outcome: Outcome, extra: dict | None = None) -> bytes:
    """The non-streaming body for a chat or text completion; ``extra`` adds top-level extension fields."""
    reason = outcome.last.finish_reason.value
    wants = _wants_logprobs(prepared)
    if prepared.kind == "chat":
        body = _head(prepared, "chat.completion")
        choice = {"index": 0, "message": _message(outcome),
                  "logprobs": chat_logprobs(outcome.logprobs) if wants else None, "finish_reason": reason}
    else:
        body = _head(prepared, "text_completion")
        choice = {"index": 0, "text": outcome.text,
                  "logprobs": completion_logprobs(outcome.logprobs) if wants else None, "finish_reason": reason}
    body["choices"] = [choice]
    body["usage"] = _usage(outcome.last)
    if extra:
        body.update(extra)
    return orjson.dumps(body)


def _message(outcome: Outcome) -> dict:
    """The assistant's message: its text, and its tool calls when it made some (then a text that is
    empty is null, as OpenAI sends it)."""
    if not outcome.tool_calls:
        return {"role": "assistant", "content": outcome.text, "refusal": None}
    return {"role": "assistant", "content": outcome.text or None, "refusal": None, "tool_calls": outcome.tool_calls}


def error_event(envelope: dict) -> bytes:
    return b"data: " + orjson.dumps(envelope) + b"\n\n"


class ChunkEncoder:
    """Renders one request's stream events."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self._prepared = prepared
        self._chat = prepared.kind == "chat"
        self._wants_logprobs = _wants_logprobs(prepared)
        self._text_offset = 0  # completions' logprobs: where the next token starts in the text
        head = _head(prepared, "chat.completion.chunk" if self._chat else "text_completion")
        if prepared.include_usage:
            head["usage"] = None  # OpenAI: every chunk but the last carries "usage": null
        self._head = head
        # Split a rendered template chunk around a marker to get the bytes before and after the text.
        marker = "\x00TEXT\x00"
        rendered = self._render(marker, None)
        before, after = rendered.split(orjson.dumps(marker))
        self._text_prefix, self._text_suffix = before, after

    def _render(self, text: str | None, finish_reason: str | None, extra: dict | None = None,
                logprobs: dict | None = None) -> bytes:
        if self._chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice], **(extra or {})}) + b"\n\n"

    def opening(self) -> bytes | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if not self._chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice]}) + b"\n\n"

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        if not self._wants_logprobs:  # the hot path: only the text is encoded
            return self._text_prefix + orjson.dumps(text) + self._text_suffix
        entries = logprobs or []
        rendered = chat_logprobs(entries) if self._chat else completion_logprobs(entries, self._text_offset)
        self._text_offset += sum(len(entry.token) for entry in entries)
        return self._render(text, None, logprobs=rendered)

    def tool_calls(self, entries: list[dict]) -> bytes:
        """An event with tool-call entries (each with its index, as OpenAI streams them)."""
        choice = {"index": 0, "delta": {"tool_calls": entries}, "logprobs": None, "finish_reason": None}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice]}) + b"\n\n"

    def closing(self, last: Delta, extra: dict | None = None) -> bytes:
        """The finish-reason event (with ``extra`` fields), then the usage event if asked for."""
        events = self._render(None, last.finish_reason.value, extra)
        if self._prepared.include_usage:
            usage = {**self._head, "choices": [], "usage": _usage(last)}
            events += b"data: " + orjson.dumps(usage) + b"\n\n"
        return events + DONE_EVENT
