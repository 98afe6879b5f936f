"""One record per HTTP request, filled in along the way and written to the request log at the end."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragllm.generation import Usage

if TYPE_CHECKING:
    from ragllm.access.keys import Principal
    from ragllm.api.state import AppState
    from ragllm.generation import DeltaStream
    from ragllm.rag.outcome import RagOutcome
    from ragllm.telemetry.metrics import Metrics, RequestTimer
    from ragllm.telemetry.tracing import RequestSpan

request_logger = logging.getLogger("ragllm.requests")

RECORDED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"}
)
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
SCOPE_KEY = "ragllm.record"


@dataclass
class RequestRecord:
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    request_id: str = field(
        default_factory=lambda: f"req-{os.urandom(16).hex()}"
    )  # replaced once prepared
    principal: Principal | None = None
    model: str = ""
    status: int = 500  # until a response starts, an exception is what happened
    finish_reason: str = ""
    cache: str = ""  # hit, miss, bypass
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    timer: RequestTimer | None = None
    disconnected: bool = False
    prompt: Any = None  # only kept when server.log_prompts is on
    completion: str | None = None
    span: RequestSpan | None = None  # when tracing is on
    finished_at: float | None = None  # perf_counter time of the last token
    rag: RagOutcome | None = None  # a RAG answer's counts, once the answer is finished
    # Every engine stream opened for the request (a whole answer that broke off is run again): what
    # the request is billed comes from them, not from what reached the client.
    engine_streams: list[DeltaStream] = field(default_factory=list)

    async def settle_usage(self) -> None:
        """Tokens the engine produced for this request, however it ended (the client gone mid-stream
        or before a whole answer, an error, a drain), raised into ``prompt_tokens`` and
        ``completion_tokens``: what is logged, counted and charged. A cache hit keeps the cached usage.
        Waits for the engine to confirm a cancelled request is out, so a step it was still running
        is charged too."""
        if self.cache != "hit":
            await asyncio.gather(*(stream.settled() for stream in self.engine_streams))
        produced = [
            usage
            for usage in (stream.produced() for stream in self.engine_streams)
            if usage is not None
        ]
        if self.cache == "hit" or not produced:
            return
        total = sum(produced, start=Usage())
        self.prompt_tokens = max(self.prompt_tokens, total.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, total.completion_tokens)

    def client_left(self, metrics: Metrics) -> None:
        """The client closed the connection before its response was complete: logged as a 499, and counted."""
        self.disconnected = True
        metrics.client_disconnects.inc()

    @property
    def billed_tokens(self) -> int:
        """Tokens charged against the key's tokens-per-minute: none for a cache hit (no engine work)."""
        return 0 if self.cache == "hit" else self.prompt_tokens + self.completion_tokens

    def first_token_headers(self) -> dict[str, str]:
        """What a stream's headers can carry: they are sent with its first token."""
        headers = {"x-ragllm-prompt-tokens": str(self.prompt_tokens)} if self.prompt_tokens else {}
        if self.queue_s is not None:
            headers["x-ragllm-queue-ms"] = f"{self.queue_s * 1000:.2f}"
        if self.timer is not None and self.timer.first_token_s is not None:
            headers["x-ragllm-ttft-ms"] = f"{self.timer.first_token_s * 1000:.2f}"
        return headers

    def timing_headers(self) -> dict[str, str]:
        """Timings of a finished non-streaming response (a stream's headers leave before they exist)."""
        ttft = self.timer.first_token_s if self.timer else None
        headers = {
            "x-ragllm-total-ms": f"{(time.perf_counter() - self.started) * 1000:.2f}",
            "x-ragllm-prompt-tokens": str(self.prompt_tokens),
            "x-ragllm-completion-tokens": str(self.completion_tokens),
        }
        if self.queue_s is not None:
            headers["x-ragllm-queue-ms"] = f"{self.queue_s * 1000:.2f}"
        if ttft is not None:
            headers["x-ragllm-ttft-ms"] = f"{ttft * 1000:.2f}"
        return headers

    def entry(self) -> dict[str, Any]:
        ttft = self.timer.first_token_s if self.timer else None
        return {
            "request_id": self.request_id,
            "key_id": self.principal.key_id if self.principal else "",
            "endpoint": self.endpoint,
            "model": self.model,
            "status": 499 if self.disconnected else self.status,
            "finish_reason": self.finish_reason or ("cancelled" if self.disconnected else ""),
            "cache": self.cache,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_ms": _ms(self.queue_s),
            "ttft_ms": _ms(ttft),
            "latency_ms": _ms(time.perf_counter() - self.started),
            "time": round(time.time(), 3),
            "trace_id": self.span.trace_id if self.span else "",
            **(self.rag.fields() if self.rag is not None else {}),
        }

    def end_span(self) -> None:
        """Place the engine's phases under the request span, then close it."""
        span, timer = self.span, self.timer
        if span is None:
            return
        if timer is not None and timer.first_token_s is not None:
            submitted = timer.started_at
            scheduled = submitted + (self.queue_s or 0.0)
            first_token = submitted + timer.first_token_s
            span.child_between("queue", submitted, scheduled)
            span.child_between("prefill", scheduled, first_token)
            span.child_between("decode", first_token, self.finished_at or time.perf_counter())
        span.finish(
            {
                "http.request.method": "POST",
                "http.route": self.endpoint,
                "http.response.status_code": 499 if self.disconnected else self.status,
                "ragllm.request_id": self.request_id,
                "gen_ai.request.model": self.model,
                "gen_ai.usage.input_tokens": self.prompt_tokens,
                "gen_ai.usage.output_tokens": self.completion_tokens,
                "gen_ai.response.finish_reasons": self.finish_reason,
                "ragllm.cache": self.cache,
                "ragllm.key_id": self.principal.key_id if self.principal else None,
                **(self.rag.span_attributes() if self.rag is not None else {}),
            }
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class RequestRecordMiddleware:
    """Counts requests by status, tracks in-flight ones, and logs each finished generation request."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in RECORDED_PATHS:
            await self.app(scope, receive, send)
            return
        record = RequestRecord(endpoint=path)
        scope[SCOPE_KEY] = record
        metrics = self.state.metrics
        trace_header: list[tuple[bytes, bytes]] = []
        if path in GENERATION_PATHS and self.state.tracing.enabled:
            headers = {
                k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())
            }
            record.span = self.state.tracing.start_request(f"POST {path}", headers)
            trace_header = [(b"x-trace-id", record.span.trace_id.encode())]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if trace_header:
                    message = {**message, "headers": [*message.get("headers", ()), *trace_header]}
            await send(message)

        lifecycle = self.state.lifecycle
        lifecycle.in_flight += 1  # what a drain waits for, and the in-flight gauge
        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics.requests.labels(path, str(record.status)).inc()
            if path in GENERATION_PATHS:
                # A task of its own, shielded: a shutdown that cancels this request must not lose its
                # log entry and charge (settling may wait for the engine to finish a step), and it
                # counts as in flight until recorded, so a drain waits for it.
                finish = asyncio.ensure_future(self._finish(record))
                finish.add_done_callback(lambda _: lifecycle.finished_one())
                await asyncio.shield(finish)
            else:
                lifecycle.finished_one()

    async def _finish(self, record: RequestRecord) -> None:
        await record.settle_usage()
        if record.cache != "hit":  # vLLM's token counters: what the engine prefilled and generated
            self.state.metrics.prompt_tokens_for_model.inc(record.prompt_tokens)
            self.state.metrics.generation_tokens_for_model.inc(record.completion_tokens)
        if record.rag is not None:  # cache hits too: the RAG series describe answers served
            self.state.metrics.rag.observe(record.model, record.rag)
        entry = record.entry()
        self.state.request_log.append(entry)
        if self.state.settings.server.log_requests:
            if record.prompt is not None:
                entry = {**entry, "prompt": record.prompt, "completion": record.completion}
            request_logger.info("request finished", extra={"fields": entry})
        if record.principal is not None:
            await self.state.limiter.spend(record.principal, record.billed_tokens)
        record.end_span()
