"""HTTP routes: OpenAI's endpoints plus /health and /metrics.

Per generation request: authenticate → rate limit → prepare → cache lookup → engine → cache store;
the record middleware logs the outcome and spends the tokens against the caller's limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import orjson

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route

from ragllm.api.body import BaseModelT, parsed_body
from ragllm.api.deps import app_state, authenticated, record_of
from ragllm.api.encoding import DONE_EVENT, ChunkEncoder, error_event, full_response
from ragllm.api.record import RequestRecord
from ragllm.api.sse import EventStreamResponse, until_disconnect
from ragllm.api.state import AppState
from ragllm.cache import CachedResponse
from ragllm.generation import Delta, EngineState, FinishReason, KVCacheStats
from ragllm.generation import DeltaStream
from ragllm.errors import (
    ClientClosedRequest,
    ClientTooSlow,
    EngineFailure,
    EngineInterrupted,
    RagLLMError,
    RateLimited,
    ShuttingDown,
)
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
from ragllm.thinking import ThinkStripper, strip_thinking
from ragllm.serving.cache_plan import CachePlan, cache_plan
from ragllm.serving.outcome import ChoiceOutcome, Outcome, Tally
from ragllm.serving.prepare import PreparedRequest
from ragllm.telemetry.metrics import RequestTimer, exposition_with_upstreams
from ragllm.telemetry.tracing import child_span

logger = logging.getLogger(__name__)
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
    return await _respond(state, prepared, request, principal, allowance)


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
            _disconnected(app_state(request), record)
        raise ClientClosedRequest("the client closed the connection before its request body was read") from None


# Matched before the FastAPI routes of the same paths (see ``create_app``).
LEAN_ROUTES = [Route("/v1/chat/completions", _lean(_generate, ChatCompletionRequest), methods=["POST"]),
               Route("/v1/completions", _lean(_generate, CompletionRequest), methods=["POST"]),
               Route("/tokenize", _lean(_tokenize, TokenizeRequest), methods=["POST"])]


async def _respond(state: AppState, prepared: PreparedRequest, request: Request, principal: Principal,
                   allowance: Allowance | None) -> Response:
    record = record_of(request)
    record.request_id, record.model, record.stream = prepared.id, prepared.model.id, prepared.stream
    if state.settings.server.log_prompts:
        generation = prepared.generation
        record.prompt = generation.messages or generation.prompt or generation.prompt_token_ids
    plan = cache_plan(prepared, principal.key_id, request.headers.get("cache-control"), state.settings.cache.enabled)
    headers = {"x-request-id": prepared.id, **(allowance.headers() if allowance else {})}
    if plan.read:
        with child_span(record.span, "cache_lookup"):
            cached = await state.cache.get(plan.key)
        state.metrics.cache_lookups.labels("hit" if cached else "miss").inc()
        if cached is not None:
            return _replay(prepared, cached, record, {**headers, "x-ragllm-cache": "hit"})
    record.cache = "miss" if plan.key else "bypass"
    headers["x-ragllm-cache"] = record.cache
    stream, timer = await _opened(state, prepared, request, record)
    if not prepared.stream:
        return await _respond_whole(state, prepared, request, record, plan, headers, stream, timer)
    events = _stream_events(state, prepared, stream, timer, record, plan)
    server = state.settings.server
    return EventStreamResponse(events, headers, on_disconnect=lambda: _disconnected(state, record),
                               late_headers=record.first_token_headers, on_abandon=lambda: _abandoned(state, record),
                               on_too_slow=lambda reason: _too_slow(state, record, reason),
                               write_timeout_s=server.write_timeout_s, buffer_bytes=server.stream_buffer_bytes,
                               budget=state.outbox_budget)


# A whole (non-streaming) answer that broke off part-way is run again: the client has seen nothing.
MAX_INTERRUPTED_RUNS = 3


async def _respond_whole(state: AppState, prepared: PreparedRequest, request: Request, record: RequestRecord,
                         plan: CachePlan, headers: dict[str, str], stream: DeltaStream,
                         timer: RequestTimer) -> Response:
    for run in range(1, MAX_INTERRUPTED_RUNS + 1):
        try:
            outcome = await until_disconnect(request.receive, state.preparer.run_to_end(
                stream, timer, prepared.generation.params.n))
            break
        except ClientClosedRequest:
            _disconnected(state, record)
            raise
        except EngineInterrupted:
            if run == MAX_INTERRUPTED_RUNS:
                raise
            stream, timer = await _opened(state, prepared, request, record)
    if prepared.strip_thinking:
        for choice in outcome.choices:
            choice.text = strip_thinking(choice.text)
    await _finished(state, record, plan, outcome.text, outcome.last, outcome.choices[0].tool_calls)
    return Response(full_response(prepared, outcome, _extensions(prepared, outcome.text)), media_type="application/json",
                    headers={**headers, **record.timing_headers()})


async def _opened(state: AppState, prepared: PreparedRequest, request: Request,
                  record: RequestRecord) -> tuple[DeltaStream, RequestTimer]:
    """The engine's stream, opened while watching the client: an upstream may take long to answer
    (its first token, or a whole answer), and a client that leaves meanwhile cancels it at once."""
    async def discard(opened: tuple[DeltaStream, RequestTimer]) -> None:
        record.engine_streams.append(opened[0])  # it may have produced tokens already: billed
        await opened[0].aclose()

    try:
        stream, timer = await until_disconnect(request.receive, state.preparer.open(prepared), discard=discard)
    except ClientClosedRequest:
        _disconnected(state, record)
        raise
    record.timer = timer
    record.engine_streams.append(stream)
    return stream, timer


def _extensions(prepared: PreparedRequest, answer: str) -> dict | None:
    """Extension fields of a finished answer: the RAG report with its checked citations."""
    return {"rag": prepared.rag.report(answer)} if prepared.rag is not None else None


def _abandoned(state: AppState, record: RequestRecord) -> bytes:
    """A stream the server stops serving (its shutdown grace is over): recorded as the 503 it is, and
    ended as every stream ends, with an error event and [DONE]."""
    error = ShuttingDown(f"the server stopped before the answer was complete ({state.lifecycle.reason or 'shutdown'}); "
                         "retry on another replica")
    record.status, record.finish_reason = error.status_code, "error"
    return error_event(error.to_envelope()) + DONE_EVENT


def _too_slow(state: AppState, record: RequestRecord, reason: str) -> None:
    """A streaming client dropped for not reading (``reason``: write_timeout, buffer_full or budget_full):
    recorded as 408, with the tokens the engine produced for it."""
    record.status = ClientTooSlow.status_code
    record.finish_reason = record.finish_reason or "cancelled"
    state.metrics.slow_clients.labels(reason).inc()


def _disconnected(state: AppState, record: RequestRecord) -> None:
    record.disconnected = True
    state.metrics.client_disconnects.inc()


async def _finished(state: AppState, record: RequestRecord, plan: CachePlan, text: str, last: Delta,
                    tool_calls: list[dict] | None = None) -> None:
    record.finished_at = time.perf_counter()
    record.finish_reason = last.finish_reason.value
    record.prompt_tokens, record.completion_tokens = last.prompt_tokens, last.completion_tokens
    record.queue_s = last.queue_time_s
    if record.prompt is not None:
        record.completion = text
    if plan.write:
        cached = CachedResponse(text, last.finish_reason.value, last.prompt_tokens, last.completion_tokens,
                                tuple(tool_calls or ()), last.cached_tokens)
        await state.cache.put(plan.key, cached, state.settings.cache.ttl_s)


async def _stream_events(state: AppState, prepared: PreparedRequest, stream: DeltaStream, timer: RequestTimer,
                         record: RequestRecord, plan: CachePlan) -> AsyncIterator[bytes]:
    """The SSE events of one answer. Every stream ends with a finish or an error event, then
    ``[DONE]``, whatever the engine did; an error before anything was sent is raised instead, so the
    client gets its real status (a 503 with Retry-After, say) rather than a 200 with an error inside."""
    encoder = ChunkEncoder(prepared)
    choices = prepared.generation.params.n
    # Keep the text only when it will be cached, logged or checked for citations: most streams need none.
    tally = Tally(choices, keep_text=plan.write or record.prompt is not None or prepared.rag is not None)
    strippers = [ThinkStripper() for _ in range(choices)] if prepared.strip_thinking else None
    opening = encoder.opening(choices) or b""  # sent with the first delta, once its timings are known
    started = False  # something was yielded: from then on errors are reported in-band
    try:
        async for delta in stream:
            timer.on_delta(delta)
            text, index = delta.text, delta.index
            if strippers is not None:
                stripper = strippers[index]
                text = stripper.feed(text) + (stripper.flush() if delta.finish_reason is not None else "")
            done = tally.add(delta, text)
            usage = tally.summary() if prepared.continuous_usage else None
            events = encoder.text(text, delta.logprobs, index, usage) if text or delta.logprobs else b""
            if delta.tool_calls:
                events += encoder.tool_calls(delta.tool_calls, index, usage)
            if opening:
                record.queue_s, record.prompt_tokens = delta.queue_time_s, delta.prompt_tokens
                events, opening = opening + events, b""
            if delta.finish_reason is not None:
                answer = tally.choices[0].text
                events += encoder.finish(delta.finish_reason.value, index,
                                         _extensions(prepared, answer) if done else None, usage)
            if done:
                summary = tally.summary()
                timer.on_finish(summary)
                started = True
                yield events + encoder.end(summary)
                await _finished(state, record, plan, answer, summary, tally.choices[0].tool_calls)
                return
            if events:
                started = True
                yield events
        raise EngineInterrupted("the engine ended the answer without finishing it")
    except Exception as exc:
        error = _as_reported(exc)
        if not started:
            raise error from exc
        record.status, record.finish_reason = error.status_code, "error"
        yield error_event(error.to_envelope()) + DONE_EVENT
    finally:
        if record.finished_at is None:  # ended early (client gone or too slow, error): bill what was produced
            _bill_produced(record, tally)
        await stream.aclose()


def _bill_produced(record: RequestRecord, tally: Tally) -> None:
    summary = tally.summary()
    record.prompt_tokens = summary.prompt_tokens or record.prompt_tokens
    record.completion_tokens = summary.completion_tokens


def _as_reported(exc: Exception) -> RagLLMError:
    """Our own errors as they are; anything else is a fault of ours, reported without its insides."""
    if isinstance(exc, RagLLMError):
        return exc
    logger.exception("a stream failed")
    return EngineFailure(f"the answer failed part-way ({type(exc).__name__}); it is incomplete")


def _replay(prepared: PreparedRequest, cached: CachedResponse, record: RequestRecord,
            headers: dict[str, str]) -> Response:
    """A cache hit: the original content and usage, under this request's fresh id and timestamp."""
    last = Delta(text="", num_tokens=0, prompt_tokens=cached.prompt_tokens,
                 completion_tokens=cached.completion_tokens, finish_reason=FinishReason(cached.finish_reason),
                 cached_tokens=cached.cached_tokens)
    record.cache, record.finish_reason = "hit", cached.finish_reason
    record.prompt_tokens, record.completion_tokens = cached.prompt_tokens, cached.completion_tokens
    extensions = _extensions(prepared, cached.text)
    tool_calls = [dict(call) for call in cached.tool_calls]
    if not prepared.stream:
        choice = ChoiceOutcome(cached.text, last.finish_reason, tool_calls=tool_calls,
                               completion_tokens=cached.completion_tokens)
        body = full_response(prepared, Outcome([choice], last), extensions)
        return Response(body, media_type="application/json", headers={**headers, **record.timing_headers()})
    encoder = ChunkEncoder(prepared)
    entries = [{"index": index, **call} for index, call in enumerate(tool_calls)]
    events = ((encoder.opening() or b"") + (encoder.text(cached.text) if cached.text else b"")
              + (encoder.tool_calls(entries) if entries else b"") + encoder.closing(last, extensions))
    return Response(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


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
