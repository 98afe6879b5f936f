"""The service's own endpoints beside OpenAI's: /v1/models, /health and /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from ragllm.api.deps import app_state, authenticated
from ragllm.generation import EngineState, KVCacheStats
from ragllm.protocol.openai import DocumentStoreHealth, HealthResponse, KVCacheHealth, ModelList
from ragllm.telemetry.metrics import exposition_with_upstreams

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(authenticated)])
async def list_models(request: Request) -> dict:
    state = app_state(request)
    created = int(state.started_at_wall)
    return {
        "object": "list",
        "data": [
            {
                "id": c.id,
                "object": "model",
                "created": created,
                "owned_by": c.owned_by,
                "max_model_len": c.max_model_len,
            }
            for c in state.engine.models()
        ],
    }


def _kv_cache_health(kv: KVCacheStats | None) -> KVCacheHealth | None:
    if kv is None:
        return None
    hit_rate = kv.prefix_cache_hits / kv.prefix_cache_queries if kv.prefix_cache_queries else None
    return KVCacheHealth(
        block_size=kv.block_size,
        blocks_total=kv.blocks_total,
        blocks_free=kv.blocks_free,
        usage=round(kv.usage, 4),
        prefix_cache_hit_rate=hit_rate,
        preemptions=kv.num_preemptions,
        dtype=kv.dtype,
        tokens_total=kv.blocks_total * kv.block_size,
        document_store=DocumentStoreHealth(
            blocks=kv.document_blocks,
            hits=kv.document_hits,
            misses=kv.document_misses,
            tokens_reused=kv.document_tokens_reused,
            tokens_recomputed=kv.document_tokens_recomputed,
        ),
    )


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> Response:
    state = app_state(request)
    engine_health = state.engine.health()
    stats = state.engine.stats()
    status = {EngineState.READY: "ok", EngineState.LOADING: "loading"}.get(
        engine_health.state, "error"
    )
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
    return Response(
        body.model_dump_json(),
        status_code=200 if status == "ok" else 503,
        media_type="application/json",
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = app_state(request)
    state.metrics.request_log_pending.set(state.request_log.num_pending)
    scraped = await state.engine.scrape_metrics()
    if not scraped:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
    return Response(
        exposition_with_upstreams(state.metrics.registry, scraped), media_type=CONTENT_TYPE_LATEST
    )
