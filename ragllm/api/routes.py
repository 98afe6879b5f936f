"""HTTP routes: OpenAI's endpoints plus /health and /metrics.

Per generation request: authenticate → rate limit → prepare → cache lookup → engine → cache store;
the record middleware logs the outcome and spends the tokens against the caller's limit.
"""

from __future__ import annotations

import time

import orjson

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route

from ragllm.api.body import BaseModelT, parsed_body
from ragllm.api.deps import app_state, authenticated, record_of
from ragllm.api.respond import Responder
from ragllm.generation import EngineState, KVCacheStats
from ragllm.errors import ClientClosedRequest, RateLimited, ShuttingDown
from ragllm.access.keys import Principal
from ragllm.access.rate_limits import Allowance
from ragllm.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    HealthResponse,
    KVCacheHealth,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from ragllm.telemetry.metrics import exposition_with_upstreams
from ragllm.telemetry.tracing import child_span

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
# One server-sent event, as OpenAPI describes text/event-stream (3.0/3.1 tools read ``schema`` per event):
# ``data`` is one JSON chunk, and ``[DONE]`` last.
_STREAM_DOC = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "description": "One server-sent event: data is a JSON chunk (chat.completion.chunk or text_completion), "
                   "then [DONE]",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer", "minimum": 0}}}}}
_CACHE_DOC = "Cache-Control: no-cache skips the response-cache lookup, no-store skips the write."


@router.post("/v1/chat/completions", description=_CACHE_DOC,
             responses={200: {"model": ChatCompletion, "content": _STREAM_DOC}, **_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           principal: Principal = Depends(authenticated)) -> Response:
    return await _generate(request, principal, await _admitted(request, principal), body)


@router.post("/v1/completions", description=_CACHE_DOC,
             responses={200: {"model": Completion, "content": _STREAM_DOC}, **_ERRORS})
async def completions(body: CompletionRequest, request: Request,
                      principal: Principal = Depends(authenticated)) -> Response:
    return await _generate(request, principal, await _admitted(request, principal), body)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request,
                   principal: Principal = Depends(authenticated)) -> Response:
    """Token counts as vLLM's /tokenize gives them (what an upstream gateway budgets RAG prompts with)."""
    return await _tokenize(request, principal, await _admitted(request, principal), body)


async def _generate(request: Request, principal: Principal, allowance: Allowance | None,
                    body: ChatCompletionRequest | CompletionRequest) -> Response:
    state = app_state(request)
    if isinstance(body, ChatCompletionRequest):
        prepared = await state.preparer.prepare_chat(body, principal.cache_group)
    else:
        prepared = state.preparer.prepare_completion(body, principal.cache_group)
    return await Responder(state, request, prepared).respond(principal, allowance)


async def _tokenize(request: Request, principal: Principal, allowance: Allowance | None,
                    body: TokenizeRequest) -> Response:
    state = app_state(request)
    model, generation = await state.preparer.prepare_tokenize(body)
    count = await state.engine.count_prompt_tokens(generation)
    return Response(orjson.dumps({"count": count, "max_model_len": model.max_model_len}),
                    media_type="application/json", headers=allowance.headers() if allowance else None)


async def _admitted(request: Request, principal: Principal) -> Allowance | None:
    """Refused while draining; counted against the caller's rate limit."""
    state = app_state(request)
    if state.lifecycle.draining:
        raise ShuttingDown(f"the server is shutting down ({state.lifecycle.reason}); retry on another replica")
    try:
        with child_span(record_of(request).span, "rate_limit"):
            return await state.limiter.admit(principal)
    except RateLimited as exc:
        state.metrics.rate_limited.labels(exc.error_type).inc()
        raise


def _lean(handler, body_model: type[BaseModelT]):
    """A POST endpoint as a plain Starlette route: the same steps as its FastAPI twin (which stays
    registered for the OpenAPI schema), without FastAPI's per-request dependency solving and body
    re-validation, which cost a gateway about a fifth of its CPU per request. Unlike FastAPI's order,
    the caller is authenticated and admitted before a byte of the body is parsed."""

    async def endpoint(request: Request) -> Response:
        principal = await authenticated(request)
        allowance = await _admitted(request, principal)
        body = await parsed_body(await _body(request), body_model, app_state(request).settings.input)
        return await handler(request, principal, allowance, body)

    return endpoint


async def _body(request: Request) -> bytes:
    """The request's bytes; a client that leaves mid-upload is a 499, as one that leaves later is
    (one request-log line, no traceback: any client can do it, at will)."""
    try:
        return await request.body()
    except ClientDisconnect:
        record = record_of(request)
        if record is not None:
            record.client_left(app_state(request).metrics)
        raise ClientClosedRequest("the client closed the connection before its request body was read") from None


# Matched before the FastAPI routes of the same paths (see ``create_app``).
LEAN_ROUTES = [Route("/v1/chat/completions", _lean(_generate, ChatCompletionRequest), methods=["POST"]),
               Route("/v1/completions", _lean(_generate, CompletionRequest), methods=["POST"]),
               Route("/tokenize", _lean(_tokenize, TokenizeRequest), methods=["POST"])]


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(authenticated)])
async def list_models(request: Request) -> dict:
    state = app_state(request)
    created = int(state.started_at_wall)
    return {
        "object": "list",
        "data": [{"id": c.id, "object": "model", "created": created, "owned_by": c.owned_by,
                  "max_model_len": c.max_model_len} for c in state.engine.models()],
    }


def _kv_cache_health(kv: KVCacheStats | None) -> KVCacheHealth | None:
    if kv is None:
        return None
    hit_rate = kv.prefix_cache_hits / kv.prefix_cache_queries if kv.prefix_cache_queries else None
    return KVCacheHealth(block_size=kv.block_size, blocks_total=kv.blocks_total, blocks_free=kv.blocks_free,
                         usage=round(kv.usage, 4), prefix_cache_hit_rate=hit_rate, preemptions=kv.num_preemptions,
                         dtype=kv.dtype, tokens_total=kv.blocks_total * kv.block_size)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> Response:
    state = app_state(request)
    engine_health = state.engine.health()
    stats = state.engine.stats()
    status = {EngineState.READY: "ok", EngineState.LOADING: "loading"}.get(engine_health.state, "error")
    detail = engine_health.detail
    if state.lifecycle.draining and status == "ok":
        status, detail = "draining", f"shutting down: {state.lifecycle.reason}"
    body = HealthResponse(
        status=status,
        model=state.settings.engine.public_model_name,
        engine=state.engine.name,
        uptime_s=round(time.monotonic() - state.started_at, 3),
        detail=detail,
        running=stats.num_running,
        waiting=stats.num_waiting,
        redis=state.redis.status() if state.redis else "disabled",
        cache=state.cache.name if state.settings.cache.enabled else "off",
        kv_cache=_kv_cache_health(stats.kv_cache),
    )
    return Response(body.model_dump_json(), status_code=200 if status == "ok" else 503,
                    media_type="application/json")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = app_state(request)
    state.metrics.request_log_pending.set(state.request_log.num_pending)
    scraped = await state.engine.scrape_metrics()
    if not scraped:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
    return Response(exposition_with_upstreams(state.metrics.registry, scraped), media_type=CONTENT_TYPE_LATEST)
