"""OpenAI response bodies and SSE events as bytes.

Streaming is the hot path: every event of a request shares the same JSON around its text, so that
JSON is rendered once per request and each event only encodes its text (one ``orjson.dumps``).
"""

from __future__ import annotations

from typing import Any

import orjson

from ragllm.generation import Delta, TokenLogprob
from ragllm.serving.outcome import ChoiceOutcome, Outcome
from ragllm.serving.prepare import PreparedRequest

DONE_EVENT = b"data: [DONE]\n\n"


def _usage(last: Delta) -> dict[str, Any]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
        # As OpenAI reports prompt caching: the prompt tokens whose KV came from the prefix cache.
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
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
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode()),
                "top_logprobs": [
                    {"token": token, "logprob": logprob, "bytes": list(token.encode())}
                    for token, logprob in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """The completions API's (legacy) ``logprobs``: parallel lists, offsets into the completion's text."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def full_response(prepared: PreparedRequest, outcome: Outcome, extra: dict | None = None) -> bytes:
    """The non-streaming body for a chat or text completion; ``extra`` adds top-level extension fields."""
    wants = _wants_logprobs(prepared)
    if prepared.kind == "chat":
        body = _head(prepared, "chat.completion")
        body["choices"] = [
            {
                "index": index,
                "message": _message(choice),
                "logprobs": chat_logprobs(choice.logprobs) if wants else None,
                "finish_reason": choice.finish_reason.value,
            }
            for index, choice in enumerate(outcome.choices)
        ]
    else:
        body = _head(prepared, "text_completion")
        body["choices"] = [
            {
                "index": index,
                "text": choice.text,
                "logprobs": completion_logprobs(choice.logprobs) if wants else None,
                "finish_reason": choice.finish_reason.value,
            }
            for index, choice in enumerate(outcome.choices)
        ]
    body["usage"] = _usage(outcome.last)
    if extra:
        body.update(extra)
    return orjson.dumps(body)


def _message(choice: ChoiceOutcome) -> dict:
    """The assistant's message: its text, and its tool calls when it made some (then a text that is
    empty is null, as OpenAI sends it)."""
    if not choice.tool_calls:
        return {"role": "assistant", "content": choice.text, "refusal": None}
    return {
        "role": "assistant",
        "content": choice.text or None,
        "refusal": None,
        "tool_calls": choice.tool_calls,
    }


def error_event(envelope: dict) -> bytes:
    return b"data: " + orjson.dumps(envelope) + b"\n\n"


class ChunkEncoder:
    """Renders one request's stream events. Choice 0's text events, the hot path, reuse the JSON
    around the text, rendered once; other choices' (n > 1) are rendered whole."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self._prepared = prepared
        self._chat = prepared.kind == "chat"
        self._wants_logprobs = _wants_logprobs(prepared)
        self._text_offsets: dict[
            int, int
        ] = {}  # completions' logprobs: where a choice's next token starts
        head = _head(prepared, "chat.completion.chunk" if self._chat else "text_completion")
        if prepared.include_usage:
            head["usage"] = None  # OpenAI: every chunk but the last carries "usage": null
        self._head = head
        # Split a rendered template chunk around a marker to get the bytes before and after the text.
        marker = "\x00TEXT\x00"
        rendered = self._render(marker, None)
        before, after = rendered.split(orjson.dumps(marker))
        self._text_prefix, self._text_suffix = before, after

    def _render(
        self,
        text: str | None,
        finish_reason: str | None,
        extra: dict | None = None,
        logprobs: dict | None = None,
        index: int = 0,
    ) -> bytes:
        if self._chat:
            delta = {} if text is None else {"content": text}
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return (
            b"data: " + orjson.dumps({**self._head, "choices": [choice], **(extra or {})}) + b"\n\n"
        )

    def opening(self, choices: int = 1) -> bytes | None:
        """Chat streams open with the assistant role, for each choice, as OpenAI's do."""
        if not self._chat:
            return None
        return b"".join(
            b"data: "
            + orjson.dumps(
                {
                    **self._head,
                    "choices": [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
            + b"\n\n"
            for index in range(choices)
        )

    def text(
        self,
        text: str,
        logprobs: list[TokenLogprob] | None = None,
        index: int = 0,
        usage: Delta | None = None,
    ) -> bytes:
        """A text event; ``usage``: the request's usage so far, carried by the event (continuous usage)."""
        extra = {"usage": _usage(usage)} if usage is not None else None
        if not self._wants_logprobs:
            if index == 0 and extra is None:  # the hot path: only the text is encoded
                return self._text_prefix + orjson.dumps(text) + self._text_suffix
            return self._render(text, None, extra, index=index)
        entries = logprobs or []
        if self._chat:
            rendered = chat_logprobs(entries)
        else:
            offset = self._text_offsets.get(index, 0)
            rendered = completion_logprobs(entries, offset)
            self._text_offsets[index] = offset + sum(len(entry.token) for entry in entries)
        return self._render(text, None, extra, logprobs=rendered, index=index)

    def tool_calls(self, entries: list[dict], index: int = 0, usage: Delta | None = None) -> bytes:
        """An event with tool-call entries (each with its index, as OpenAI streams them)."""
        choice = {
            "index": index,
            "delta": {"tool_calls": entries},
            "logprobs": None,
            "finish_reason": None,
        }
        extra = {"usage": _usage(usage)} if usage is not None else {}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice], **extra}) + b"\n\n"

    def finish(
        self,
        finish_reason: str,
        index: int = 0,
        extra: dict | None = None,
        usage: Delta | None = None,
    ) -> bytes:
        """One choice's finish event (with ``extra`` fields on the request's last one)."""
        if usage is not None:
            extra = {**(extra or {}), "usage": _usage(usage)}
        return self._render(None, finish_reason, extra, index=index)

    def end(self, summary: Delta) -> bytes:
        """After every choice has finished: the usage event if asked for, then ``[DONE]``."""
        events = b""
        if self._prepared.include_usage:
            usage = {**self._head, "choices": [], "usage": _usage(summary)}
            events += b"data: " + orjson.dumps(usage) + b"\n\n"
        return events + DONE_EVENT

    def closing(self, last: Delta, extra: dict | None = None) -> bytes:
        """A one-choice answer's finish event (with ``extra`` fields), then the usage event if asked
        for, and ``[DONE]``."""
        return self.finish(last.finish_reason.value, 0, extra) + self.end(last)
