"""Bounds on what one request may carry, so that no request makes the server do unbounded work.

Counts (messages, documents) are checked on the decoded JSON before it is validated: a request with
30,000 documents is refused without building 30,000 models. Sizes, stop strings, a blank cache_salt,
sampling values that would break the numerics, and template switches are checked on the validated
request. One text budget covers everything a prompt is made of: messages, documents, tool definitions,
tool-call arguments and schemas. Every refusal is a 400 (or 413 for sizes) naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ragllm.config import InputSettings
from ragllm.errors import InvalidRequest, RequestTooLarge, Unsupported
from ragllm.generation import REQUEST_TEMPLATE_KEY
from ragllm.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from ragllm.rag.contract import RagDocument

# Below these a temperature or a repetition penalty divides logits into overflow (inf, then NaN
# probabilities); a temperature of 0 is greedy.
MIN_TEMPERATURE = 1e-2
MIN_REPETITION_PENALTY = 1e-2
# chat_template_kwargs a request may set: the documented switches of the templates we serve.
TEMPLATE_SWITCHES = frozenset({"enable_thinking", "thinking", "reasoning_effort"})
TEMPLATE_VALUE_MAX_CHARS = 64


def check_raw(body: Any, bounds: InputSettings) -> None:
    """Counts of the decoded JSON body, before validation."""
    if not isinstance(body, dict):
        return
    for field, limit in (("messages", bounds.max_messages), ("documents", bounds.max_documents)):
        items = body.get(field)
        if isinstance(items, list) and len(items) > limit:
            raise InvalidRequest(
                f"{field} has {len(items)} items; at most {limit} are allowed "
                f"(RAGLLM_INPUT__MAX_{field.upper()})",
                param=field,
                code="array_above_max_length",
            )
    if isinstance(body.get("logit_bias"), dict) and body["logit_bias"]:
        # Refused whatever it holds: validating 100,000 entries first would only delay the same answer.
        raise Unsupported("logit_bias is not supported", param="logit_bias")


@dataclass(frozen=True, slots=True)
class PromptText:
    """UTF-8 bytes of what a request is made of. ``content``: messages' text (or a completion's prompt),
    rendered as it is; ``structure``: tool definitions and tool-call arguments, which a template may
    render more compactly; ``schemas``: structured-output constraints, never rendered into the prompt;
    ``documents``: RAG documents, which packing may drop."""

    content: int = 0
    structure: int = 0
    documents: int = 0
    schemas: int = 0

    @property
    def total(self) -> int:
        return self.content + self.structure + self.documents + self.schemas

    def at_least_tokens(self, max_token_bytes: int) -> int:
        """Tokens the prompt takes at the least, documents aside, known without tokenizing: a token
        covers at most ``max_token_bytes`` bytes, and a template renders at least half of the structure's
        compact JSON (every name and value in it)."""
        return -(-(self.content + self.structure // 2) // max_token_bytes)


def check_chat(body: ChatCompletionRequest, bounds: InputSettings) -> PromptText:
    check_raw({"messages": body.messages, "documents": body.documents}, bounds)
    text = PromptText(
        content=sum(_content_bytes(message.content) for message in body.messages),
        structure=_calls_bytes(body.messages) + _json_bytes(body.tools),
        schemas=_schema_bytes(body),
        documents=_documents_bytes(body.documents, bounds),
    )
    _check_text_bytes(text, "messages", bounds)
    check_template_kwargs(body.chat_template_kwargs, bounds)
    check_sampling(body, bounds)
    return text


def check_completion(body: CompletionRequest, bounds: InputSettings) -> PromptText:
    prompt = body.prompt
    size = (
        _utf8(prompt)
        if isinstance(prompt, str)
        else sum(_utf8(p) for p in prompt if isinstance(p, str))
    )
    text = PromptText(content=size, schemas=_schema_bytes(body))
    _check_text_bytes(text, "prompt", bounds)
    check_sampling(body, bounds)
    return text


def check_tokenize(body: TokenizeRequest, bounds: InputSettings) -> PromptText:
    text = PromptText(content=_utf8(body.prompt))
    if body.messages is not None:
        check_raw({"messages": body.messages, "documents": body.documents}, bounds)
        text = PromptText(
            content=sum(_content_bytes(message.content) for message in body.messages),
            structure=_calls_bytes(body.messages),
            documents=_documents_bytes(body.documents, bounds),
        )
    _check_text_bytes(text, "messages" if body.messages is not None else "prompt", bounds)
    check_template_kwargs(body.chat_template_kwargs, bounds)
    return text


def check_detokenize(body: DetokenizeRequest, max_model_len: int) -> None:
    """No more ids than the model's context holds: no prompt or answer of this model is longer."""
    if len(body.tokens) > max_model_len:
        raise InvalidRequest(
            f"tokens has {len(body.tokens)} ids; at most {max_model_len} (this model's context "
            "length) are allowed",
            param="tokens",
            code="array_above_max_length",
        )


def check_sampling(body: SamplingFields, bounds: InputSettings) -> None:
    if body.temperature is not None and 0.0 < body.temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}; "
            f"{body.temperature!r} is too small to sample with",
            param="temperature",
        )
    if body.repetition_penalty is not None and body.repetition_penalty < MIN_REPETITION_PENALTY:
        raise InvalidRequest(
            f"repetition_penalty must be at least {MIN_REPETITION_PENALTY} (1 is off); "
            f"{body.repetition_penalty!r} is too small",
            param="repetition_penalty",
        )
    if body.cache_salt is not None and not body.cache_salt.strip():
        # vLLM refuses a blank salt too; refused here, the same request is valid on every engine.
        raise InvalidRequest("cache_salt must not be blank", param="cache_salt")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    for index, stop in enumerate(stops):
        if len(stop) > bounds.max_stop_length:
            raise InvalidRequest(
                f"stop strings may be at most {bounds.max_stop_length} characters; "
                f"stop[{index}] has {len(stop)}",
                param="stop",
                code="string_above_max_length",
            )


def check_template_kwargs(kwargs: dict[str, Any] | None, bounds: InputSettings) -> None:
    """Only the documented switches, as plain values; a template of the caller's own only where allowed."""
    for key, value in (kwargs or {}).items():
        if key == REQUEST_TEMPLATE_KEY:
            if not bounds.allow_request_chat_template:
                raise InvalidRequest(
                    "a chat template supplied by the request is not allowed on this server "
                    "(RAGLLM_INPUT__ALLOW_REQUEST_CHAT_TEMPLATE)",
                    param=f"chat_template_kwargs.{key}",
                )
            if not isinstance(value, str):
                raise InvalidRequest(
                    "chat_template must be a string", param=f"chat_template_kwargs.{key}"
                )
            continue
        if key not in TEMPLATE_SWITCHES:
            allowed = ", ".join(sorted(TEMPLATE_SWITCHES))
            raise InvalidRequest(
                f"chat_template_kwargs.{key} is not supported; allowed: {allowed}",
                param=f"chat_template_kwargs.{key}",
            )
        if not isinstance(value, bool | int | float | str) or (
            isinstance(value, str) and len(value) > TEMPLATE_VALUE_MAX_CHARS
        ):
            raise InvalidRequest(
                f"chat_template_kwargs.{key} must be a boolean, a number or a short string",
                param=f"chat_template_kwargs.{key}",
            )


def _check_text_bytes(text: PromptText, param: str, bounds: InputSettings) -> None:
    if text.total > bounds.max_text_bytes:
        parts = {
            param: text.content,
            "tools": text.structure + text.schemas,
            "documents": text.documents,
        }
        largest = max(parts, key=parts.__getitem__)
        raise RequestTooLarge(
            f"the request holds {text.total} bytes of text ({text.content} in the {param}, "
            f"{text.structure + text.schemas} in tools, tool-call arguments and schemas, "
            f"{text.documents} in "
            f"documents); at most {bounds.max_text_bytes} are allowed (RAGLLM_INPUT__MAX_TEXT_BYTES)",
            param=largest,
        )


def _documents_bytes(documents: list[RagDocument] | None, bounds: InputSettings) -> int:
    size = sum(_utf8(d.text) + _utf8(d.title) + _utf8(d.source) for d in documents or ())
    if size > bounds.max_documents_bytes:
        raise RequestTooLarge(
            f"the documents hold {size} bytes; at most {bounds.max_documents_bytes} "
            "are allowed (RAGLLM_INPUT__MAX_DOCUMENTS_BYTES)",
            param="documents",
        )
    return size


def _calls_bytes(messages: list[ChatMessage]) -> int:
    return sum(
        _utf8(call.function.arguments) + _utf8(call.function.name)
        for message in messages
        for call in message.tool_calls or ()
    )


def _schema_bytes(body: SamplingFields) -> int:
    fields = (
        body.structured_outputs,
        body.guided_json,
        body.guided_regex,
        body.guided_grammar,
        body.guided_choice,
        getattr(body, "response_format", None) and body.response_format.json_schema,
    )
    return sum(
        _utf8(value) if isinstance(value, str) else _json_bytes(value) for value in fields if value
    )


def _json_bytes(value: Any) -> int:
    # The body's depth is bounded (JsonLimits) well below orjson's own limit, so this cannot fail.
    return len(orjson.dumps(value)) if value else 0


def _content_bytes(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _utf8(content)
    return sum(_utf8(getattr(part, "text", None)) for part in content)


def _utf8(text: str | None) -> int:
    # Bytes of UTF-8 without encoding: ASCII-only text is by far the common case.
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
