"""Request counting by endpoint and status, and the in-flight gauge, as a thin ASGI wrapper."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragllm.telemetry.metrics import Metrics

COUNTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in COUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started
        metrics = self.metrics

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(path, str(status)).inc()
