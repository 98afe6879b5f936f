"""Every kind of answer validates against OpenAI's published response schema (the objects of its
OpenAPI description, in tests/data): strict clients that check responses accept ours."""

from __future__ import annotations

import httpx
import pytest

from tests.support.openai_schema import WEATHER, sse_events, validate

CHAT = {
    "messages": [{"role": "user", "content": "Name a colour."}],
    "max_tokens": 6,
    "temperature": 0,
}
TEXT = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
DOCUMENTS = [{"id": "sky", "text": "The sky is blue because of Rayleigh scattering."}]

CASES = {
    "chat": ("chat", CHAT),
    "chat-logprobs": ("chat", {**CHAT, "logprobs": True, "top_logprobs": 2}),
    "chat-tool-call": (
        "chat",
        {**CHAT, "max_tokens": 40, "tools": [WEATHER], "tool_choice": "required"},
    ),
    "chat-structured": (
        "chat",
        {**CHAT, "max_tokens": 30, "response_format": {"type": "json_object"}},
    ),
    "chat-rag": (
        "chat",
        {
            **CHAT,
            "documents": DOCUMENTS,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        },
    ),
    "text": ("text", TEXT),
    "text-logprobs": ("text", {**TEXT, "logprobs": 2}),
}
PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions"}
WHOLE = {"chat": "CreateChatCompletionResponse", "text": "CreateCompletionResponse"}
CHUNK = {"chat": "CreateChatCompletionStreamResponse", "text": "CreateCompletionResponse"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("cache", ["fresh", "replayed"])
def test_answers_validate_against_openais_schema(server, model, case, stream, cache):
    kind, body = CASES[case]
    body = {**body, "model": model, "seed": 1, "stream": stream}
    if stream:
        # Fresh streams carry the usage on every chunk (vLLM's extension); replayed ones only at the end.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": cache == "fresh"}
    headers = {"Cache-Control": "no-cache, no-store"} if cache == "fresh" else {}
    for _ in range(1 if cache == "fresh" else 2):  # the second time from the response cache
        response = httpx.post(f"{server.url}{PATHS[kind]}", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
    if cache == "replayed":  # answers with logprobs are never cached
        assert response.headers["x-ragllm-cache"] == ("bypass" if "logprobs" in case else "hit")
    if not stream:
        validate(response.json(), WHOLE[kind])
        return
    events = sse_events(response.text)
    for event in events:
        validate(event, CHUNK[kind])
    assert events[-1]["usage"]["total_tokens"] > 0
