"""OpenAI's POST endpoints, each declared once: FastAPI documents it from its signature, and an
``AdmittedRoute`` serves it (authenticate → admit → parse the body → the endpoint).

Per generation request, from there: prepare → cache lookup → engine → cache store (``Responder``);
the record middleware logs the outcome and spends the tokens against the caller's limit.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from ragllm.access.keys import Principal
from ragllm.access.rate_limits import Allowance
from ragllm.api.admitted_route import AdmittedRoute, admitted
from ragllm.api.deps import app_state, authenticated
from ragllm.api.respond import Responder
from ragllm.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from ragllm.serving.tokenize import tokenize_answer

router = APIRouter(route_class=AdmittedRoute)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
# One server-sent event, as OpenAPI describes text/event-stream (3.0/3.1 tools read ``schema`` per event):
# ``data`` is one JSON chunk, and ``[DONE]`` last.
_STREAM_DOC = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "description": "One server-sent event: data is a JSON chunk (chat.completion.chunk or text_completion), "
            "then [DONE]",
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer", "minimum": 0},
            },
        }
    }
}
_CACHE_DOC = "Cache-Control: no-cache skips the response-cache lookup, no-store skips the write."


@router.post(
    "/v1/chat/completions",
    description=_CACHE_DOC,
    responses={200: {"model": ChatCompletion, "content": _STREAM_DOC}, **_ERRORS},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    principal: Principal = Depends(authenticated),
    allowance: Allowance | None = Depends(admitted),
) -> Response:
    state = app_state(request)
    prepared = await state.preparer.prepare_chat(body, principal.cache_group)
    return await Responder(state, request, prepared).respond(principal, allowance)


@router.post(
    "/v1/completions",
    description=_CACHE_DOC,
    responses={200: {"model": Completion, "content": _STREAM_DOC}, **_ERRORS},
)
async def completions(
    body: CompletionRequest,
    request: Request,
    principal: Principal = Depends(authenticated),
    allowance: Allowance | None = Depends(admitted),
) -> Response:
    state = app_state(request)
    prepared = state.preparer.prepare_completion(body, principal.cache_group)
    return await Responder(state, request, prepared).respond(principal, allowance)


# The tokenizer routes also say 501 where the engine cannot (an upstream without token ids).
_TOKENIZER_ERRORS = {**_ERRORS, 501: {"model": ErrorResponse}}


@router.post("/tokenize", response_model=TokenizeResponse, responses=_TOKENIZER_ERRORS)
async def tokenize(
    body: TokenizeRequest,
    request: Request,
    principal: Principal = Depends(authenticated),
    allowance: Allowance | None = Depends(admitted),
) -> Response:
    """Token counts as vLLM's /tokenize gives them (what an upstream gateway budgets RAG prompts
    with); the prompt's ids with return_token_ids; with documents, a dry run of the chat
    completion's packing: which documents it would use and drop, and the budget, nothing generated."""
    state = app_state(request)
    prepared = await state.preparer.prepare_tokenize(body)
    return _json(await tokenize_answer(state.engine, prepared, body), allowance)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_TOKENIZER_ERRORS)
async def detokenize(
    body: DetokenizeRequest,
    request: Request,
    principal: Principal = Depends(authenticated),
    allowance: Allowance | None = Depends(admitted),
) -> Response:
    """vLLM's /detokenize: token ids back to their text, special tokens written out."""
    state = app_state(request)
    state.preparer.prepare_detokenize(body)
    return _json({"prompt": await state.engine.detokenize(body.tokens)}, allowance)


def _json(answer: dict, allowance: Allowance | None) -> Response:
    return Response(
        orjson.dumps(answer),
        media_type="application/json",
        headers=allowance.headers() if allowance else None,
    )
