"""One prepared request's response, streamed or whole: the response cache, the engine's answer as SSE
events or one JSON body, and the request record filled in however the answer ends.

Every delta of an answer, streamed or whole, passes one loop (``_tallied``): timed, counted and
stripped of thinking by one ``Tally``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from ragllm.access.keys import Principal
from ragllm.access.rate_limits import Allowance
from ragllm.api.deps import record_of
from ragllm.api.encoding import DONE_EVENT, ChunkEncoder, error_event, full_response
from ragllm.api.record import RequestRecord
from ragllm.api.sse import EventStreamResponse, until_disconnect
from ragllm.api.state import AppState
from ragllm.cache import CachedResponse
from ragllm.errors import (
    ClientClosedRequest,
    ClientTooSlow,
    EngineFailure,
    EngineInterrupted,
    RagLLMError,
    ShuttingDown,
)
from ragllm.generation import Delta, DeltaStream, FinishReason
from ragllm.serving.cache_plan import CachePlan, cache_plan
from ragllm.serving.outcome import ChoiceOutcome, Outcome, Tally, closed_early
from ragllm.serving.prepare import PreparedRequest
from ragllm.telemetry.metrics import RequestTimer
from ragllm.telemetry.tracing import child_span

logger = logging.getLogger(__name__)

# A whole (non-streaming) answer that broke off part-way is run again: the client has seen nothing.
MAX_INTERRUPTED_RUNS = 3


class Responder:
    """Answers one prepared request: a cache hit replayed, else the engine's answer, streamed or whole.
    The request record learns what happened (usage, finish, timings, a client gone), the cache keeps
    what it may, and an answer that ends early is billed for what the engine produced."""

    __slots__ = ("state", "request", "prepared", "record", "plan", "read_at")

    def __init__(self, state: AppState, request: Request, prepared: PreparedRequest) -> None:
        self.state, self.request, self.prepared = state, request, prepared
        self.record = record_of(request)
        self.plan: CachePlan | None = None
        self.read_at: float | None = None  # the cache's clock at the lookup (cache/index.py)

    async def respond(self, principal: Principal, allowance: Allowance | None) -> Response:
        """The response, headed with the request's id, the caller's rate limits and what the cache did."""
        state, prepared, record = self.state, self.prepared, self.record
        record.request_id, record.model, record.stream = (
            prepared.id,
            prepared.model.id,
            prepared.stream,
        )
        if state.settings.server.log_prompts:
            generation = prepared.generation
            record.prompt = generation.messages or generation.prompt or generation.prompt_token_ids
        plan = self.plan = cache_plan(
            prepared,
            principal.key_id,
            self.request.headers.get("cache-control"),
            state.settings.cache.enabled,
            principal.cache_group,
        )
        headers = {"x-request-id": prepared.id, **(allowance.headers() if allowance else {})}
        # A write-only plan needs the cache's clock only for an answer listed under documents: other
        # answers are stored without it, so they cost no round trip before generating.
        if plan.read or (plan.write and plan.documents):
            with child_span(record.span, "cache_lookup"):
                lookup = await state.cache.lookup(plan.key if plan.read else None)
            self.read_at, cached = lookup.as_of, lookup.response
            if plan.read:
                state.metrics.cache_lookups.labels("hit" if cached else "miss").inc()
            if cached is not None:
                return self._replay(cached, {**headers, "x-ragllm-cache": "hit"})
        record.cache = "miss" if plan.key else "bypass"
        headers["x-ragllm-cache"] = record.cache
        stream, timer = await self._opened()
        if not prepared.stream:
            return await self._whole(headers, stream, timer)
        server = state.settings.server
        return EventStreamResponse(
            self._events(stream, timer),
            headers,
            on_disconnect=self._disconnected,
            late_headers=record.first_token_headers,
            on_abandon=self._abandoned,
            on_too_slow=self._too_slow,
            write_timeout_s=server.write_timeout_s,
            buffer_bytes=server.stream_buffer_bytes,
            budget=state.outbox_budget,
        )

    def _replay(self, cached: CachedResponse, headers: dict[str, str]) -> Response:
        """A cache hit: the original content and usage, under this request's fresh id and timestamp."""
        prepared, record = self.prepared, self.record
        last = Delta(
            text="",
            num_tokens=0,
            prompt_tokens=cached.prompt_tokens,
            completion_tokens=cached.completion_tokens,
            finish_reason=FinishReason(cached.finish_reason),
            cached_tokens=cached.cached_tokens,
        )
        record.cache, record.finish_reason = "hit", cached.finish_reason
        record.prompt_tokens, record.completion_tokens = (
            cached.prompt_tokens,
            cached.completion_tokens,
        )
        closed = [0] if cached.closed_early else []
        extensions = self._extensions(cached.text, closed)
        tool_calls = [dict(call) for call in cached.tool_calls]
        if not prepared.stream:
            choice = ChoiceOutcome(
                cached.text,
                last.finish_reason,
                tool_calls=tool_calls,
                completion_tokens=cached.completion_tokens,
            )
            body = full_response(prepared, Outcome([choice], last), extensions)
            return Response(
                body,
                media_type="application/json",
                headers={**headers, **record.timing_headers(), **closed_early_header(closed)},
            )
        encoder = ChunkEncoder(prepared)
        entries = [{"index": index, **call} for index, call in enumerate(tool_calls)]
        events = (
            (encoder.opening() or b"")
            + (encoder.text(cached.text) if cached.text else b"")
            + (encoder.tool_calls(entries) if entries else b"")
            + encoder.closing(last, extensions)
        )
        return Response(
            events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
        )

    async def _opened(self) -> tuple[DeltaStream, RequestTimer]:
        """The engine's stream, opened while watching the client: an upstream may take long to answer
        (its first token, or a whole answer), and a client that leaves meanwhile cancels it at once."""
        record = self.record

        async def discard(opened: tuple[DeltaStream, RequestTimer]) -> None:
            record.engine_streams.append(opened[0])  # it may have produced tokens already: billed
            await opened[0].aclose()

        try:
            stream, timer = await until_disconnect(
                self.request.receive, self.state.preparer.open(self.prepared), discard=discard
            )
        except ClientClosedRequest:
            self._disconnected()
            raise
        record.timer = timer
        record.engine_streams.append(stream)
        return stream, timer

    async def _whole(
        self, headers: dict[str, str], stream: DeltaStream, timer: RequestTimer
    ) -> Response:
        """One JSON body, once every choice has finished; the client is watched meanwhile."""
        prepared, record = self.prepared, self.record
        for run in range(1, MAX_INTERRUPTED_RUNS + 1):
            try:
                outcome = await until_disconnect(
                    self.request.receive, _gathered(stream, timer, prepared)
                )
                break
            except ClientClosedRequest:
                self._disconnected()
                raise
            except EngineInterrupted:
                if run == MAX_INTERRUPTED_RUNS:
                    raise
                stream, timer = await self._opened()
        await self._finished(
            outcome.text, outcome.last, outcome.choices[0].tool_calls, outcome.choices[0]
        )
        closed = outcome.closed_early
        return Response(
            full_response(prepared, outcome, self._extensions(outcome.text, closed)),
            media_type="application/json",
            headers={**headers, **record.timing_headers(), **closed_early_header(closed)},
        )

    async def _events(self, stream: DeltaStream, timer: RequestTimer) -> AsyncIterator[bytes]:
        """The SSE events of one answer. Every stream ends with a finish or an error event, then
        ``[DONE]``, whatever the engine did; an error before anything was sent is raised instead, so the
        client gets its real status (a 503 with Retry-After, say) rather than a 200 with an error inside."""
        prepared, record = self.prepared, self.record
        encoder = ChunkEncoder(prepared)
        choices = prepared.generation.params.n
        # Keep the text only when it will be cached, logged or checked for citations: most streams need none.
        tally = Tally(
            choices,
            keep_text=self.plan.write or record.prompt is not None or prepared.rag is not None,
            strip_thinking=prepared.strip_thinking,
        )
        deltas = _tallied(stream, timer, tally)
        opening = (
            encoder.opening(choices) or b""
        )  # sent with the first delta, once its timings are known
        started = False  # something was yielded: from then on errors are reported in-band
        try:
            async for delta, text in deltas:
                index = delta.index
                usage = tally.summary() if prepared.continuous_usage else None
                events = (
                    encoder.text(text, delta.logprobs, index, usage)
                    if text or delta.logprobs
                    else b""
                )
                if delta.tool_calls:
                    events += encoder.tool_calls(delta.tool_calls, index, usage)
                if opening:
                    record.queue_s, record.prompt_tokens = delta.queue_time_s, delta.prompt_tokens
                    events, opening = opening + events, b""
                if delta.finish_reason is not None:
                    answer = tally.choices[0].text
                    events += encoder.finish(
                        delta.finish_reason.value,
                        index,
                        self._extensions(answer, closed_early(tally.choices))
                        if tally.done
                        else None,
                        usage,
                    )
                if tally.done:
                    summary = tally.summary()
                    started = True
                    yield events + encoder.end(summary)
                    await self._finished(
                        answer, summary, tally.choices[0].tool_calls, tally.choices[0]
                    )
                    break
                if events:
                    started = True
                    yield events
        except Exception as exc:
            error = _as_reported(exc)
            if not started:
                raise error from exc
            record.status, record.finish_reason = error.status_code, "error"
            yield error_event(error.to_envelope()) + DONE_EVENT
        finally:
            if (
                record.finished_at is None
            ):  # ended early (client gone or too slow, error): bill what was produced
                _bill_produced(record, tally)
            await deltas.aclose()

    async def _finished(
        self,
        text: str,
        last: Delta,
        tool_calls: list[dict] | None = None,
        first: ChoiceOutcome | None = None,
    ) -> None:
        record, plan = self.record, self.plan
        record.finished_at = time.perf_counter()
        record.finish_reason = last.finish_reason.value
        record.prompt_tokens, record.completion_tokens = last.prompt_tokens, last.completion_tokens
        record.queue_s = last.queue_time_s
        if record.prompt is not None:
            record.completion = text
        # An answer listed under documents needs the lookup's time, to be checked against
        # invalidations that came while it was generated.
        if plan.write and (self.read_at is not None or not plan.documents):
            cached = CachedResponse(
                text,
                last.finish_reason.value,
                last.prompt_tokens,
                last.completion_tokens,
                tuple(tool_calls or ()),
                last.cached_tokens,
                first is not None and first.closed_early,
            )
            await self.state.cache.put(
                plan.key, cached, self.state.settings.cache.ttl_s, plan.documents, self.read_at
            )

    def _extensions(self, answer: str, closed: list[int] | None = None) -> dict | None:
        """Extension fields of a finished answer: the RAG report with its checked citations (the
        request record keeps the report's counts, for metrics, the request log and the trace), and
        the choices closed early under their grammar because their budget was ending."""
        rag, extensions = self.prepared.rag, {}
        if rag is not None:
            extensions["rag"], self.record.rag = rag.answered(answer)
        if closed:
            extensions["structured"] = {"closed_early": closed}
        return extensions or None

    def _abandoned(self) -> bytes:
        """A stream the server stops serving (its shutdown grace is over): recorded as the 503 it is, and
        ended as every stream ends, with an error event and [DONE]."""
        reason = self.state.lifecycle.reason or "shutdown"
        error = ShuttingDown(
            f"the server stopped before the answer was complete ({reason}); retry on another replica"
        )
        self.record.status, self.record.finish_reason = error.status_code, "error"
        return error_event(error.to_envelope()) + DONE_EVENT

    def _too_slow(self, reason: str) -> None:
        """A streaming client dropped for not reading (``reason``: write_timeout, buffer_full or
        budget_full): recorded as 408, with the tokens the engine produced for it."""
        self.record.status = ClientTooSlow.status_code
        self.record.finish_reason = self.record.finish_reason or "cancelled"
        self.state.metrics.slow_clients.labels(reason).inc()

    def _disconnected(self) -> None:
        self.record.client_left(self.state.metrics)


async def _tallied(
    stream: DeltaStream, timer: RequestTimer, tally: Tally
) -> AsyncIterator[tuple[Delta, str]]:
    """Each delta of an answer with its text as shown, timed and counted. The answer is complete once
    ``tally.done`` (a stream's events stop there; a whole answer reads the stream to its end, which
    engines put right after the last finish); a stream that ends before then is an EngineInterrupted.
    The stream is closed however this ends."""
    try:
        async for delta in stream:
            timer.on_delta(delta)
            text = tally.add(delta)
            if tally.done:
                timer.on_finish(tally.summary())
            yield delta, text
    finally:
        await stream.aclose()
    if not tally.done:
        raise EngineInterrupted("the engine ended the answer without finishing it")


async def _gathered(stream: DeltaStream, timer: RequestTimer, prepared: PreparedRequest) -> Outcome:
    """A whole answer: every choice's text, calls and log probabilities, once all have finished."""
    tally = Tally(prepared.generation.params.n, strip_thinking=prepared.strip_thinking)
    async for _ in _tallied(stream, timer, tally):
        pass
    return tally.outcome()


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


CLOSED_EARLY_HEADER = "x-ragllm-closed-early"


def closed_early_header(closed: list[int]) -> dict[str, str]:
    """A whole answer's header saying a choice was closed early under its grammar (a stream says it
    in its last finish event: its headers are sent before the answer ends)."""
    return {CLOSED_EARLY_HEADER: "1"} if closed else {}
