"""The ASGI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from ragllm import __version__
from ragllm.api.handlers import install_error_handlers
from ragllm.api.middleware import RequestMetricsMiddleware
from ragllm.api.routes import router
from ragllm.api.state import AppState
from ragllm.config import Settings
from ragllm.engines import create_engine
from ragllm.engines.base import Engine
from ragllm.service import CompletionService
from ragllm.telemetry.metrics import Metrics

logger = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. The engine loads in the background: /health answers 503 until it is ready."""
    engine = engine or create_engine(settings.engine)
    metrics = Metrics(settings.engine.public_model_name)
    metrics.watch_engine(engine.stats)
    state = AppState(settings=settings, engine=engine, metrics=metrics,
                     service=CompletionService(engine, metrics))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start_engine(engine))
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await engine.aclose()

    app = FastAPI(
        title="rag-llm-service",
        version=__version__,
        description="OpenAI-compatible completions for retrieval-augmented generation.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.ragllm = state
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except Exception:  # reported through /health; the server stays up to say so
        logger.exception("engine %s failed to start", engine.name)
