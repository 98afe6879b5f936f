"""An upstream's answer, relayed: its SSE events (or one whole JSON answer) turned into deltas.

Anything the upstream sends that is not a well-formed OpenAI answer (malformed JSON, an error of any
shape, a stream that ends unfinished) becomes one of our errors, so the client's stream still ends
with an error event and ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from ragllm.engines.upstream.envelope import error_fields, is_error_event
from ragllm.errors import EngineFailure, EngineInterrupted
from ragllm.generation import Delta, DeltaStream, FinishReason, TokenLogprob, Usage

# Choices an upstream answer may hold (requests ask for at most 8).
MAX_RELAYED_CHOICES = 8


class UpstreamStream(DeltaStream):
    """Reads an upstream's SSE stream and turns it into deltas; the first one is read ahead.
    ``replica_failed`` is called when the connection breaks mid-answer, ``release`` once when the
    stream closes (the pool's bookkeeping stays the engine's)."""

    def __init__(
        self,
        response: Any,
        request_id: str,
        url: str,
        release: Callable[[], None],
        replica_failed: Callable[[], None],
        incremental: bool = True,
        wants_logprobs: bool = False,
    ) -> None:
        self.request_id = request_id
        self.response = response
        self.url = url  # the upstream's, for errors that name it
        self._release, self._replica_failed = release, replica_failed
        self._wants_logprobs = wants_logprobs
        self._events = self._parse() if incremental else self._parse_whole()
        self._first: Delta | None = None
        self._done = False
        # What the upstream has spent so far, for billing a request however it ends: the usage it
        # reported last (with continuous usage stats, on every chunk) and the chunks of text read.
        self._reported = Usage()
        self._chunks = 0

    async def prefetch(self) -> None:
        self._first = await anext(self._events)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        import aiohttp

        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            async for delta in self._events:
                yield delta
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._replica_failed()
            raise EngineInterrupted(
                f"the upstream {self.url} broke off the answer "
                f"({type(exc).__name__}); the answer is incomplete"
            ) from exc
        finally:
            await self.aclose()

    async def _parse(self) -> AsyncIterator[Delta]:
        """Deltas as the events come, each with its choice's index; each choice's finish once the
        stream ends, holding the usage the upstream reported (the prompt once, the tokens of all)."""
        prompt_tokens = total_tokens = cached_tokens = 0
        counted: dict[
            int, int
        ] = {}  # chunks seen per choice: one chunk ≈ one token until usage says
        finishes: dict[int, FinishReason] = {}
        async for raw in self.response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = self._event(data)
            usage = event.get("usage")
            if usage:
                prompt_tokens, total_tokens = _usage_counts(usage, prompt_tokens, total_tokens)
                cached_tokens = _cached_tokens(usage)
                self._reported = Usage(prompt_tokens, total_tokens)
            for choice in _choices(event):
                index = _index(choice)
                text, logprobs, tool_calls = (
                    _choice_text(choice),
                    self._logprobs(choice),
                    _tool_calls(choice),
                )
                if choice.get("finish_reason"):
                    finishes[index] = _finish_reason(choice)
                if text or logprobs or tool_calls:
                    counted[index] = counted.get(index, 0) + 1
                    self._chunks += 1
                    yield Delta(
                        text=text,
                        num_tokens=1,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=counted[index],
                        logprobs=logprobs,
                        tool_calls=tool_calls,
                        index=index,
                    )
        if not finishes or any(index not in finishes for index in counted):
            raise EngineInterrupted(
                f"the upstream {self.url} ended the stream without finishing the answer"
            )
        last = max(finishes)
        for index in sorted(
            finishes
        ):  # the usage total is split so the choices' counts add up to it
            tokens = counted.get(index, 0)
            if index == last and total_tokens:
                tokens = max(
                    0, total_tokens - sum(counted.get(i, 0) for i in finishes if i != last)
                )
            yield Delta(
                text="",
                num_tokens=0,
                prompt_tokens=prompt_tokens,
                completion_tokens=tokens,
                finish_reason=finishes[index],
                index=index,
                cached_tokens=cached_tokens,
            )

    async def _parse_whole(self) -> AsyncIterator[Delta]:
        """A non-streaming answer: one delta a choice, with all of it (the usage's completion tokens
        on the last)."""
        answer = self._event(await self.response.read())
        choices = _choices(answer) or [{}]
        if not all(choice.get("finish_reason") for choice in choices):
            raise EngineInterrupted(f"the upstream {self.url} answered without finishing")
        prompt_tokens, completion_tokens = _usage_counts(answer.get("usage") or {}, 0, 0)
        cached_tokens = _cached_tokens(answer.get("usage") or {})
        self._reported = Usage(prompt_tokens, completion_tokens)
        for position, choice in enumerate(choices):
            text = _choice_text(choice)
            tokens = completion_tokens if position == len(choices) - 1 else 0
            yield Delta(
                text=text,
                num_tokens=tokens,
                prompt_tokens=prompt_tokens,
                completion_tokens=tokens,
                logprobs=self._logprobs(choice) if text else None,
                tool_calls=_tool_calls(choice),
                finish_reason=_finish_reason(choice),
                index=_index(choice, position),
                cached_tokens=cached_tokens,
            )

    def _logprobs(self, choice: dict[str, Any]) -> list[TokenLogprob] | None:
        """The choice's logprobs, when asked for: OpenAI's chat form or the completions' legacy form."""
        if not self._wants_logprobs:
            return None
        logprobs = choice.get("logprobs")
        if not logprobs:
            if _choice_text(choice):
                raise EngineFailure(
                    f"the upstream {self.url} sent no logprobs, though asked; "
                    "it may not support them"
                )
            return None
        try:
            return _chat_logprobs(logprobs) if "content" in logprobs else _legacy_logprobs(logprobs)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise EngineFailure(f"the upstream {self.url} sent malformed logprobs") from exc

    def _event(self, data: bytes) -> dict[str, Any]:
        """One upstream JSON object; an error it reports, or anything malformed, as our EngineFailure."""
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise EngineFailure(
                f"the upstream {self.url} sent malformed JSON: {data[:80]!r}"
            ) from exc
        if not isinstance(event, dict):
            raise EngineFailure(
                f"the upstream {self.url} sent {type(event).__name__}, not an object"
            )
        if is_error_event(event):  # never skipped for want of choices: the answer failed
            raise EngineFailure(f"upstream error: {error_fields(event).message}")
        return event

    def produced(self) -> Usage:
        """The upstream's own count where it gave one; a chunk of text is at least a token."""
        reported = self._reported
        return Usage(reported.prompt_tokens, max(reported.completion_tokens, self._chunks))

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self.response.close()
            self._release()


def _choices(event: dict[str, Any]) -> list[dict[str, Any]]:
    choices = event.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise EngineFailure("the upstream sent malformed choices")
    return choices


def _choice_text(choice: dict[str, Any]) -> str:
    holder = choice.get("delta") or choice.get("message") or {}
    text = (holder.get("content") if isinstance(holder, dict) else None) or choice.get("text") or ""
    if not isinstance(text, str):
        raise EngineFailure("the upstream sent text that is not a string")
    return text


def _index(choice: dict[str, Any], default: int = 0) -> int:
    index = choice.get("index", default)
    if not isinstance(index, int) or not 0 <= index < MAX_RELAYED_CHOICES:
        raise EngineFailure(
            f"the upstream sent a choice index {index!r} outside 0..{MAX_RELAYED_CHOICES - 1}"
        )
    return index


def _tool_calls(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The choice's tool calls as streamed entries, relayed as the upstream sent them (a whole
    message's calls get the index their position gives them)."""
    holder = choice.get("delta") or choice.get("message") or {}
    calls = holder.get("tool_calls") if isinstance(holder, dict) else None
    if not calls:
        return None
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        raise EngineFailure("the upstream sent malformed tool_calls")
    return [
        {"index": position, **call} if "index" not in call else call
        for position, call in enumerate(calls)
    ]


def _finish_reason(choice: dict[str, Any]) -> FinishReason:
    reason = choice["finish_reason"]
    return {"length": FinishReason.LENGTH, "tool_calls": FinishReason.TOOL_CALLS}.get(
        reason, FinishReason.STOP
    )


def _usage_counts(usage: Any, prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
    try:
        return int(usage.get("prompt_tokens", prompt_tokens)), int(
            usage.get("completion_tokens", completion_tokens)
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise EngineFailure("the upstream sent malformed usage") from exc


def _cached_tokens(usage: Any) -> int:
    """The upstream's prefix-cache hit, where it reports one (vLLM with prompt token details, OpenAI)."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and cached >= 0 else 0


def _chat_logprobs(logprobs: dict[str, Any]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            entry["token"],
            float(entry["logprob"]),
            tuple((top["token"], float(top["logprob"])) for top in entry.get("top_logprobs") or ()),
        )
        for entry in logprobs["content"] or ()
    ]


def _legacy_logprobs(logprobs: dict[str, Any]) -> list[TokenLogprob]:
    tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [
        TokenLogprob(token, float(value), tuple((t, float(v)) for t, v in (top or {}).items()))
        for token, value, top in zip(tokens, values, tops, strict=True)
    ]
