"""OpenTelemetry traces over OTLP/HTTP, on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

One server span per generation request, continuing the caller's W3C ``traceparent``, with children
for auth, rate limit and cache lookup (timed as they run) and for queue, prefill and decode (placed
afterwards from the engine's timestamps, so tracing adds nothing per token). Off, every call here is
a no-op and the SDK is not even imported.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ragllm.config import TelemetrySettings

SERVICE_NAME = "rag-llm-service"


class Tracing:
    def __init__(self, settings: TelemetrySettings) -> None:
        self._provider: Any = None
        self._tracer: Any = None
        if settings.otlp_endpoint:
            self._start(settings.otlp_endpoint)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def _start(self, endpoint: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from ragllm import __version__

        resource = Resource.create({"service.name": SERVICE_NAME, "service.version": __version__})
        self._provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("ragllm")

    def start_request(self, name: str, headers: Mapping[str, str]) -> RequestSpan | None:
        if self._tracer is None:
            return None
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(carrier=headers)
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        return RequestSpan(self._tracer, span)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes what is batched


class RequestSpan:
    """The server span of one request and the way to hang children under it."""

    def __init__(self, tracer: Any, span: Any) -> None:
        self._tracer = tracer
        self.span = span
        # Wall-clock anchor, so perf_counter timestamps can be placed on the span timeline.
        self._perf0, self._wall0_ns = time.perf_counter(), time.time_ns()

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def _context(self) -> Any:
        from opentelemetry.trace import set_span_in_context

        return set_span_in_context(self.span)

    @contextlib.contextmanager
    def child(self, name: str) -> Iterator[None]:
        with self._tracer.start_as_current_span(name, context=self._context()):
            yield

    def child_between(self, name: str, start_perf: float, end_perf: float) -> None:
        span = self._tracer.start_span(
            name, context=self._context(), start_time=self._ns(start_perf)
        )
        span.end(end_time=self._ns(end_perf))

    def _ns(self, perf: float) -> int:
        return self._wall0_ns + int((perf - self._perf0) * 1e9)

    def finish(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            if value is not None and value != "":
                self.span.set_attribute(key, value)
        status = attributes.get("http.response.status_code", 200)
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()


@contextlib.contextmanager
def child_span(request_span: RequestSpan | None, name: str) -> Iterator[None]:
    """A timed child of the request span, or nothing when tracing is off."""
    if request_span is None:
        yield
        return
    with request_span.child(name):
        yield
