"""A fast OpenAI-compatible stub upstream for gateway benchmarks: raw asyncio, keep-alive HTTP/1.1.

Answers /health, /v1/models and /v1/chat/completions (streaming or not) at once, with ``max_tokens``
one-word chunks, so what a gateway adds in front of it is what gets measured.

By default a whole stream goes out in one write, so a gateway reads all its events at once: a best
case for the gateway's CPU per event. ``--pace-ms N`` writes one event per write, N ms apart (chunked
transfer encoding), as vLLM streams tokens at its inter-token interval: the gateway then wakes for
every event, as it does in production.

    python bench/stub_upstream.py --port 9100 [--pace-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

MODEL = "stub"
MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "owned_by": "stub", "max_model_len": 8192}],
    }
)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _events(tokens: int) -> list[bytes]:
    created = int(time.time())
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    events = [
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": " word"},
                    "finish_reason": "length" if index == tokens - 1 else None,
                }
            ],
        }
        for index in range(tokens)
    ]
    events.append(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL,
            "choices": [],
            "usage": usage,
        }
    )
    return [b"data: " + orjson.dumps(event) + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _completion(tokens: int, stream: bool) -> bytes:
    created = int(time.time())
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    if not stream:
        return _response(
            "200 OK",
            orjson.dumps(
                {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "created": created,
                    "model": MODEL,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " word" * tokens},
                            "finish_reason": "length",
                        }
                    ],
                    "usage": usage,
                }
            ),
        )
    body = b"".join(_events(tokens))
    return _response("200 OK", body, b"text/event-stream")


class StubProtocol(asyncio.Protocol):
    def __init__(self, pace_s: float = 0.0) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.pace_s = pace_s
        self.pending: asyncio.Task | None = None  # a paced stream being written on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            path = head.split(" ", 2)[1]
            if self.pace_s and path == "/v1/chat/completions" and orjson.loads(body).get("stream"):
                self.pending = asyncio.ensure_future(self._paced(orjson.loads(body), self.pending))
            else:
                self.transport.write(self._answer(path, body))

    async def _paced(self, request: dict, previous: asyncio.Task | None) -> None:
        if previous is not None:  # a client pipelining requests gets its answers in order
            await previous
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for index, event in enumerate(_events(int(request.get("max_tokens") or 16))):
            if index:
                await asyncio.sleep(self.pace_s)
            if self.transport.is_closing():
                return
            self.transport.write(_chunked(event))
        self.transport.write(b"0\r\n\r\n")

    @staticmethod
    def _answer(path: str, body: bytes) -> bytes:
        if path == "/health":
            return _response("200 OK", b"{}")
        if path == "/v1/models":
            return _response("200 OK", MODELS)
        if path == "/v1/chat/completions":
            request = orjson.loads(body)
            return _completion(int(request.get("max_tokens") or 16), bool(request.get("stream")))
        return _response("404 Not Found", b'{"error": {"message": "not found"}}')


async def serve(port: int, pace_ms: float = 0.0) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: StubProtocol(pace_ms / 1e3), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument(
        "--pace-ms", type=float, default=0.0, help="one event per write, this far apart"
    )
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.port, arguments.pace_ms))
