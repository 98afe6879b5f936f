"""HTTP routes: OpenAI's endpoints plus /health and /metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from ragllm.api.encoding import DONE_EVENT, ChunkEncoder, error_event, full_response
from ragllm.api.sse import EventStreamResponse, until_disconnect
from ragllm.api.state import AppState
from ragllm.engines.base import DeltaStream, EngineState
from ragllm.errors import ClientClosedRequest, RagLLMError
from ragllm.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    HealthResponse,
    ModelList,
)
from ragllm.service import PreparedRequest
from ragllm.telemetry.metrics import RequestTimer

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 500, 503)}
_STREAM_DOC = {"text/event-stream": {"schema": {"type": "string", "description": "SSE chunks, then [DONE]"}}}


def _state(request: Request) -> AppState:
    return request.app.state.ragllm


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": _STREAM_DOC}, **_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    return await _respond(state, state.service.prepare_chat(body), request)


@router.post("/v1/completions", responses={200: {"model": Completion, "content": _STREAM_DOC}, **_ERRORS})
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    return await _respond(state, state.service.prepare_completion(body), request)


async def _respond(state: AppState, prepared: PreparedRequest, request: Request) -> Response:
    stream, timer = await state.service.open(prepared)
    headers = {"x-request-id": prepared.id}
    if prepared.stream:
        events = _stream_events(prepared, stream, timer)
        return EventStreamResponse(events, headers, on_disconnect=state.metrics.client_disconnects.inc)
    try:
        outcome = await until_disconnect(request.receive, state.service.run_to_end(stream, timer))
    except ClientClosedRequest:
        state.metrics.client_disconnects.inc()
        raise
    return Response(full_response(prepared, outcome), media_type="application/json", headers=headers)


async def _stream_events(prepared: PreparedRequest, stream: DeltaStream, timer: RequestTimer) -> AsyncIterator[bytes]:
    encoder = ChunkEncoder(prepared)
    try:
        opening = encoder.opening()
        if opening is not None:
            yield opening
        async for delta in stream:
            timer.on_delta(delta)
            if delta.finish_reason is not None:
                timer.on_finish(delta)
                closing = encoder.closing(delta)
                yield encoder.text(delta.text) + closing if delta.text else closing
            elif delta.text:
                yield encoder.text(delta.text)
    except RagLLMError as exc:  # the stream has started: report in-band, then end it properly
        yield error_event(exc.to_envelope()) + DONE_EVENT
    finally:
        await stream.aclose()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> dict:
    cards = _state(request).engine.models()
    created = int(_state(request).started_at_wall)
    return {
        "object": "list",
        "data": [{"id": c.id, "object": "model", "created": created, "owned_by": c.owned_by,
                  "max_model_len": c.max_model_len} for c in cards],
    }


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> Response:
    state = _state(request)
    engine_health = state.engine.health()
    stats = state.engine.stats()
    status = {EngineState.READY: "ok", EngineState.LOADING: "loading"}.get(engine_health.state, "error")
    body = HealthResponse(
        status=status,
        model=state.settings.engine.public_model_name,
        engine=state.engine.name,
        uptime_s=round(time.monotonic() - state.started_at, 3),
        detail=engine_health.detail,
        running=stats.num_running,
        waiting=stats.num_waiting,
    )
    return Response(body.model_dump_json(), status_code=200 if status == "ok" else 503,
                    media_type="application/json")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
