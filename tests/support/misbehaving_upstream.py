"""A misbehaving OpenAI-compatible upstream on loopback: what a broken replica or proxy may send.

It is a test double for the upstream (the gateway is what the tests are about). It answers probes
like a healthy server; what it does with a chat completion depends on the question, which names a
behaviour in ``BEHAVIOURS``. Events are paced one per write, as a real server streams them. The
chat bodies it receives are kept in ``received``, for tests of what a gateway sends upstream.
"""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.servers import MODEL, free_port

GOOD_TEXT = ["The ", "answer ", "is ", "42."]


def _chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    event = {
        "id": "up-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}\n\n'
# vLLM's error, as its older versions send it (flat, beside "object": "error") and its newer ones
# (nested); both with the HTTP status as an integer ``code``, which OpenAI's schema does not allow.
STREAM_ERROR_MESSAGE = "the upstream ran out of KV-cache blocks"
REFUSAL_MESSAGE = "This model's maximum context length is 2048 tokens."


def vllm_error(message: str, status: int, nested: bool) -> dict:
    fields = {
        "message": message,
        "type": "BadRequestError" if status < 500 else "InternalServerError",
        "param": None,
        "code": status,
    }
    return {"error": fields} if nested else {"object": "error", **fields}


def _event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# An error, then more of the answer as if nothing happened: the error must not be skipped.
_AFTER_ERROR = [_chunk("answer "), _chunk(finish="stop"), USAGE, b"data: [DONE]\n\n"]
BEHAVIOURS: dict[str, list[bytes]] = {
    "good": [_chunk(t) for t in GOOD_TEXT] + [_chunk(finish="stop"), USAGE, b"data: [DONE]\n\n"],
    "garbage": [_chunk("The "), _chunk("answer "), b"data: {this is not json\n\n"],
    "string-error": [
        _chunk("The "),
        b'data: {"error": "upstream exploded"}\n\n',
        b"data: [DONE]\n\n",
    ],
    "not-an-object": [_chunk("The "), b"data: [1, 2, 3]\n\n", b"data: [DONE]\n\n"],
    "no-finish": [_chunk("The "), _chunk("answer "), b"data: [DONE]\n\n"],
    "bad-usage": [
        _chunk("The "),
        _chunk(finish="stop"),
        b'data: {"usage": "lots"}\n\n',
        b"data: [DONE]\n\n",
    ],
    "flat-error-then-more": [
        _chunk("The "),
        _event(vllm_error(STREAM_ERROR_MESSAGE, 500, nested=False)),
        *_AFTER_ERROR,
    ],
    "nested-error-then-more": [
        _chunk("The "),
        _event(vllm_error(STREAM_ERROR_MESSAGE, 500, nested=True)),
        *_AFTER_ERROR,
    ],
}
# Questions the upstream refuses outright (a 400 before any answer), streaming or not.
REFUSALS: dict[str, dict] = {
    "refuse-flat": vllm_error(REFUSAL_MESSAGE, 400, nested=False),
    "refuse-nested": vllm_error(REFUSAL_MESSAGE, 400, nested=True),
}
# A question "refuse-with:<json>" is refused with that JSON, whatever it is, as the error body.
REFUSE_WITH = "refuse-with:"


async def _chat(request: Request) -> Response:
    body = await request.json()
    request.app.state.received.append(body)
    behaviour = body["messages"][-1]["content"]
    if behaviour in REFUSALS:
        return JSONResponse(REFUSALS[behaviour], status_code=400)
    if behaviour.startswith(REFUSE_WITH):
        return Response(
            behaviour.removeprefix(REFUSE_WITH), status_code=400, media_type="application/json"
        )
    if not body.get("stream"):
        if behaviour == "good":
            return JSONResponse(
                {
                    "id": "up-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": MODEL,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(GOOD_TEXT)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 4},
                }
            )
        return Response(b"<html>502 from a proxy in the way</html>", media_type="text/html")

    async def events():
        for event in BEHAVIOURS[behaviour]:
            yield event
            await asyncio.sleep(0.01)

    return StreamingResponse(events(), media_type="text/event-stream")


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _models(request: Request) -> Response:
    return JSONResponse(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 2048}]}
    )


# What its /metrics serves: one vLLM series, so a gateway's merged exposition can be checked.
METRICS_TEXT = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3.0\n"
METRICS_DELAY_S = 0.2  # a scrape takes this long, so concurrent scrapes of the gateway overlap


class MisbehavingUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_scrapes = 0  # GET /metrics received
        app = Starlette(
            routes=[
                Route("/health", _health),
                Route("/v1/models", _models),
                Route("/v1/chat/completions", _chat, methods=["POST"]),
                Route("/metrics", self._metrics),
            ]
        )
        self.received: list[dict] = []  # chat request bodies, in arrival order
        app.state.received = self.received
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _metrics(self, request: Request) -> Response:
        self.metrics_scrapes += 1
        await asyncio.sleep(METRICS_DELAY_S)
        return Response(METRICS_TEXT, media_type="text/plain")

    def start(self) -> MisbehavingUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the misbehaving upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
