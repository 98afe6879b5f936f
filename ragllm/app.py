"""The ASGI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from ragllm import __version__
from ragllm.access.keys import KeyRing
from ragllm.access.rate_limits import RateLimiter
from ragllm.api import admin, health, routes
from ragllm.api.body_limit import BodyLimitMiddleware
from ragllm.api.handlers import install_error_handlers
from ragllm.api.outbox_budget import OutboxBudget
from ragllm.api.record import RequestRecordMiddleware
from ragllm.api.state import AppState
from ragllm.cache import ResponseCache
from ragllm.cache.memory import MemoryCache
from ragllm.config import Settings
from ragllm.engines import create_engine
from ragllm.engines.base import Engine
from ragllm.lifecycle import EXIT_ENGINE_FAILED, Lifecycle
from ragllm.redis_link import RedisLink
from ragllm.serving.prepare import RequestPreparer
from ragllm.telemetry.metrics import Metrics
from ragllm.telemetry.request_log import RequestLog
from ragllm.telemetry.tracing import Tracing

logger = logging.getLogger(__name__)


class ConfigurationError(ValueError):
    """The settings cannot work together; raised before anything starts."""


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. The engine loads in the background: /health answers 503 until it is ready."""
    if settings.redis.required and not settings.redis.url:
        raise ConfigurationError(
            f"the {settings.profile} profile needs Redis: set REDIS_URL "
            "(e.g. redis://127.0.0.1:6379/0)"
        )
    try:
        keys = KeyRing.from_settings(settings.auth, settings.limits)
    except (ValueError, OSError) as exc:
        raise ConfigurationError(str(exc)) from exc
    engine = engine or create_engine(settings)
    metrics = Metrics(settings.engine.public_model_name)
    metrics.watch_engine(engine.stats)
    redis = None
    if settings.redis.url:
        redis = RedisLink(
            settings.redis, on_fallback=lambda op: metrics.redis_fallbacks.labels(op).inc()
        )
    state = AppState(
        settings=settings,
        engine=engine,
        metrics=metrics,
        preparer=RequestPreparer(engine, metrics, settings.input, settings.rag),
        redis=redis,
        cache=_response_cache(settings, redis),
        keys=keys,
        limiter=RateLimiter(redis),
        request_log=RequestLog(
            settings.request_log, redis, on_drop=metrics.request_log_dropped.inc
        ),
        tracing=Tracing(settings.telemetry),
        lifecycle=Lifecycle(settings.server.shutdown_grace_s),
        outbox_budget=OutboxBudget(settings.server.stream_buffer_total_bytes),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start_engine(engine))
        watching = asyncio.create_task(_watch_engine(state))
        state.request_log.start()
        try:
            yield
        finally:
            for task in (loading, watching):
                task.cancel()
            await asyncio.gather(loading, watching, return_exceptions=True)
            await engine.aclose()
            await state.request_log.aclose()
            state.tracing.shutdown()
            if redis is not None:
                await redis.aclose()

    app = FastAPI(
        title="rag-llm-service",
        version=__version__,
        description="OpenAI-compatible completions for retrieval-augmented generation.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        **_without_framework_telemetry(),
    )
    metrics.watch_in_flight(lambda: state.lifecycle.in_flight)
    metrics.watch_stream_buffers(lambda: state.outbox_budget.num_bytes)
    app.state.ragllm = state
    # The POST routes are the app's own, not an included router's: FastAPI serves an included route
    # through its per-request route context and dependency exit stacks, which they have no use for.
    app.router.routes.extend(routes.router.routes)
    app.include_router(health.router)
    app.router.routes.extend(admin.router.routes)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.server.max_body_bytes)
    app.add_middleware(RequestRecordMiddleware, state=state)  # outermost: it records the 413s too
    return app


def _without_framework_telemetry() -> dict:
    """FastAPI's own OpenTelemetry hooks (newer releases) are off: ``telemetry.tracing`` makes the
    request spans, and the hooks cost a provider lookup through ``os.environ`` on every request."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def _response_cache(settings: Settings, redis: RedisLink | None) -> ResponseCache:
    if redis is not None:
        from ragllm.cache.redis_impl import RedisCache

        return RedisCache(redis, settings.cache.max_answers_per_document)
    return MemoryCache(settings.cache.max_bytes, settings.cache.max_answers_per_document)


ENGINE_WATCH_INTERVAL_S = 0.5


async def _watch_engine(state: AppState) -> None:
    """An engine broken beyond repair takes the process down (status 70), so the orchestrator starts
    a fresh one; until then /health says why and requests get 503."""
    while True:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        health = state.engine.health()
        if health.restart_needed and state.settings.server.exit_on_engine_failure:
            state.lifecycle.request_exit(EXIT_ENGINE_FAILED, health.detail)
            return


async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except Exception:  # reported through /health; the server stays up to say so
        logger.exception("engine %s failed to start", engine.name)
