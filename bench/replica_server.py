"""A model of a vLLM replica served over HTTP, for capacity work: an OpenAI-compatible chat endpoint
whose timing is ``ragllm.testing.replica_model.ReplicaModel`` run in real time (not a test double of vLLM's API:
the answers are filler words; what it models is when they come).

A request's document set is its first message (the RAG system message with its documents), its
prompt tokens a quarter of the characters, its answer ``max_tokens`` tokens; each step streams one
token to every running request. ``--time-scale`` stretches every step (a 2-core machine can then
host 16 replicas and the gateway in front of them without its own CPU being the bottleneck).
/metrics exports vLLM's series the router and autoscalers read.

    python bench/replica_server.py --host 127.0.0.1 --port 9200 [--time-scale 10] [--slowdown 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import sys
import time
from pathlib import Path

import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ragllm.testing.replica_model import ReplicaModel, ReplicaProfile, SimRequest  # noqa: E402

MODEL = "replica-model"


class ReplicaService:
    def __init__(
        self, time_scale: float, slowdown: float, profile: ReplicaProfile = ReplicaProfile()
    ) -> None:
        self.model = ReplicaModel(profile, slowdown=slowdown)
        self.time_scale = time_scale
        self.step_done = asyncio.Event()
        self.wake = asyncio.Event()
        self.steps = 0
        self.started: dict[int, int] = {}  # request index → the step its first token ended
        self.served = 0
        self._indices = itertools.count()

    async def run(self) -> None:
        while True:
            if not self.model.has_work():
                self.wake.clear()
                await self.wake.wait()
            duration = self.model.start_step() * self.time_scale
            await asyncio.sleep(duration)
            first, _ = self.model.finish_step(time.monotonic())
            for request in first:
                self.started[request.index] = self.steps
            self.steps += 1
            done, self.step_done = self.step_done, asyncio.Event()
            done.set()

    def submit(self, body: dict) -> SimRequest:
        messages = body.get("messages") or [{"content": ""}]
        head = str(messages[0].get("content") or "")
        rest = sum(len(str(m.get("content") or "")) for m in messages[1:])
        doc_set = int.from_bytes(hashlib.blake2b(head.encode(), digest_size=8).digest(), "big")
        doc_tokens = len(head) // 4
        request = SimRequest(
            index=next(self._indices),
            doc_set=doc_set,
            doc_tokens=doc_tokens,
            prompt_tokens=doc_tokens + max(1, rest // 4),
            output_tokens=max(1, int(body.get("max_tokens") or 16)),
            arrival=time.monotonic(),
        )
        self.model.submit(request)
        self.wake.set()
        return request

    async def tokens(self, request: SimRequest):
        """Yields the count of new tokens after each step, from the first token to the last."""
        sent = 0
        while sent < request.output_tokens:
            event = self.step_done
            await event.wait()
            if request.index in self.started:
                due = min(request.output_tokens, self.steps - self.started[request.index])
                if due > sent:
                    yield due - sent
                    sent = due
        self.started.pop(request.index, None)


def _chunk(text: str, finish: str | None = None, usage: dict | None = None) -> bytes:
    event = {
        "id": "chatcmpl-model",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL,
        "choices": []
        if usage
        else [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    if usage:
        event["usage"] = usage
    return b"data: " + orjson.dumps(event) + b"\n\n"


def make_app(service: ReplicaService) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": MODEL, "object": "model", "owned_by": "model", "max_model_len": 32768}
                ],
            }
        )

    async def metrics(_: web.Request) -> web.Response:
        model = service.model
        doc_tokens = model.profile.cache_doc_sets
        lines = [
            f"vllm:num_requests_running {len(model.running) + len(model.admitted_this_step)}",
            f"vllm:num_requests_waiting {len(model.waiting)}",
            f"vllm:kv_cache_usage_perc {min(1.0, len(model.cache) / doc_tokens)}",
            f"vllm:prefix_cache_queries_total {model.lookups}",
            f"vllm:prefix_cache_hits_total {model.hits}",
            f"replica_model_requests_total {service.served}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        simulated = service.submit(body)
        service.served += 1
        usage = {
            "prompt_tokens": simulated.prompt_tokens,
            "completion_tokens": simulated.output_tokens,
            "total_tokens": simulated.prompt_tokens + simulated.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        if not body.get("stream"):
            async for _ in service.tokens(simulated):
                pass
            usage["prompt_tokens_details"]["cached_tokens"] = (
                simulated.doc_tokens if simulated.cache_hit else 0
            )
            return web.json_response(
                {
                    "id": "chatcmpl-model",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": MODEL,
                    "usage": usage,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "length",
                            "message": {
                                "role": "assistant",
                                "content": " word" * simulated.output_tokens,
                            },
                        }
                    ],
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        sent = 0
        async for count in service.tokens(simulated):
            sent += count
            await response.write(
                _chunk(" word" * count, "length" if sent >= simulated.output_tokens else None)
            )
        usage["prompt_tokens_details"]["cached_tokens"] = (
            simulated.doc_tokens if simulated.cache_hit else 0
        )
        await response.write(_chunk("", usage=usage) + b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/v1/models", models),
            web.get("/metrics", metrics),
            web.post("/v1/chat/completions", chat),
        ]
    )
    return app


async def serve(host: str, port: int, time_scale: float, slowdown: float) -> None:
    service = ReplicaService(time_scale, slowdown)
    runner = web.AppRunner(make_app(service), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await service.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--slowdown", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.time_scale, args.slowdown))
