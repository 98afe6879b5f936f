"""The load generator against a test double of an LLM server with known delays.

The double (not a model: the generator's own timing is what is under test) waits 60 ms before its
first token and 25 ms between tokens, so TTFT, ITL and TPOT have known values.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from ragllm.cli import main
from ragllm.loadtest.generator import Bounds, run_level
from ragllm.loadtest.workload import Workload
from tests.support.servers import free_port

FIRST_TOKEN_S = 0.060
TOKEN_GAP_S = 0.025
NUM_TOKENS = 8


class DelayedTokenServer:
    """A test double of a streaming chat server with fixed delays; it counts the requests it gets."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _chat(self, request):
        self.requests += 1
        body = await request.json()
        assert body["stream"] and body["stream_options"]["include_usage"]

        async def events():
            await asyncio.sleep(FIRST_TOKEN_S)
            for index in range(NUM_TOKENS):
                if index:
                    await asyncio.sleep(TOKEN_GAP_S)
                chunk = {
                    "choices": [
                        {"index": 0, "delta": {"content": f"t{index} "}, "finish_reason": None}
                    ]
                }
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            usage = {
                "choices": [],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": NUM_TOKENS,
                    "total_tokens": 5 + NUM_TOKENS,
                },
            }
            yield b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def __enter__(self) -> DelayedTokenServer:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def delayed_server():
    with DelayedTokenServer() as server:
        yield server


def test_timings_come_from_the_clients_own_timestamps(delayed_server):
    level = asyncio.run(
        run_level(delayed_server.url, Workload(model="m"), Bounds(requests=6), concurrency=2)
    )
    assert level["completed"] == 6 and level["errors"] == 0
    assert FIRST_TOKEN_S * 1000 <= level["ttft_ms"]["p50"] <= FIRST_TOKEN_S * 1000 + 40
    assert TOKEN_GAP_S * 1000 <= level["itl_ms"]["p50"] <= TOKEN_GAP_S * 1000 + 15
    assert TOKEN_GAP_S * 1000 <= level["tpot_ms"]["p50"] <= TOKEN_GAP_S * 1000 + 15
    expected_latency = FIRST_TOKEN_S + (NUM_TOKENS - 1) * TOKEN_GAP_S
    assert expected_latency * 1000 <= level["latency_ms"]["p50"] <= expected_latency * 1000 + 60
    assert level["output_tokens"] == 6 * NUM_TOKENS


def test_request_and_duration_bounds_are_honoured(delayed_server):
    before = delayed_server.requests
    asyncio.run(
        run_level(delayed_server.url, Workload(model="m"), Bounds(requests=5), concurrency=3)
    )
    assert delayed_server.requests - before == 5
    started = time.perf_counter()
    level = asyncio.run(
        run_level(delayed_server.url, Workload(model="m"), Bounds(duration_s=0.5), concurrency=2)
    )
    elapsed = time.perf_counter() - started
    assert (
        elapsed < 0.5 + 0.4
    )  # the last requests started before the deadline finish, no new ones begin
    assert level["completed"] >= 2
    with pytest.raises(ValueError, match="bounded"):
        Bounds()


def test_open_loop_rate(delayed_server):
    level = asyncio.run(
        run_level(delayed_server.url, Workload(model="m"), Bounds(requests=8), rate=40.0)
    )
    assert level["completed"] == 8 and level["rate"] == 40.0


def test_cli_writes_table_and_json_and_compares(delayed_server, tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        main(
            [
                "loadtest",
                "--url",
                delayed_server.url,
                "--concurrency",
                "1,2",
                "--requests",
                "4",
                "--json",
                str(first),
            ]
        )
        == 0
    )
    report = json.loads(first.read_text())
    png = first.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    assert all(level["completed"] == 4 for level in report["levels"])
    assert (
        main(
            [
                "loadtest",
                "--url",
                delayed_server.url,
                "--concurrency",
                "1,2",
                "--requests",
                "4",
                "--json",
                str(second),
                "--compare",
                str(first),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "TTFT p50" in out and "change against the earlier report" in out


def test_a_server_that_is_down_is_reported_as_errors(tmp_path):
    level = asyncio.run(
        run_level(
            f"http://127.0.0.1:{free_port()}",
            Workload(model="m"),
            Bounds(requests=2),
            concurrency=1,
        )
    )
    assert level["errors"] == 2 and level["completed"] == 0
    assert "ConnectError" in level["error_samples"][0]
