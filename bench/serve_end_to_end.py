"""The same model end to end through `ragllm serve` (HTTP, streaming) at concurrency 1 and 32: what the
service layer costs on top of the engine (`bench/gpu_engine.py` without `--skip-serve`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_workload import DECODE_TOKENS, PROMPT_TOKENS
from bench.server import unwind_on_sigterm
from ragllm.testing.random_checkpoints import word


def serve_end_to_end(model_dir: Path, max_model_len: int, log_path: Path) -> dict:
    import httpx

    log = open(log_path, "wb")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "RAGLLM_ENGINE__MAX_NUM_SEQS": "64",
        "RAGLLM_ENGINE__MAX_BATCH_SIZE": "64",
        "RAGLLM_ENGINE__MAX_NUM_BATCHED_TOKENS": "8192",
        "RAGLLM_ENGINE__MAX_WAITING": "256",
        "RAGLLM_ENGINE__DTYPE": "bfloat16",
        "RAGLLM_SERVER__LOG_REQUESTS": "false",
    }
    unwind_on_sigterm()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ragllm.cli",
            "serve",
            "--model",
            str(model_dir),
            "--device",
            "cuda",
            "--port",
            str(port),
            "--max-model-len",
            str(max_model_len),
            "--served-model-name",
            "bench",
        ],
        env=env,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                health = httpx.get(f"{url}/health")
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                health = None
            if time.monotonic() > deadline or server.poll() is not None:
                return {"error": f"not ready: {health.text if health is not None else 'no answer'}"}
            time.sleep(0.5)
        try:
            return asyncio.run(_drive(url))
        except Exception as exc:  # reported, with the server's log beside the JSON
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


async def _drive(url: str) -> dict:
    import httpx

    prompt_sizes: set[int] = set()  # reported, so a tokenizer that loses the words shows

    async def one(client: httpx.AsyncClient, index: int) -> tuple[float, int, float]:
        body = {
            "model": "bench",
            "max_tokens": DECODE_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {
                    "role": "user",
                    "content": " ".join(
                        word((index * 131 + i) % 5000) for i in range(PROMPT_TOKENS)
                    ),
                }
            ],
        }
        start = time.perf_counter()
        first, tokens = None, 0
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"cache-control": "no-store"}
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(
                    f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                )
            async for line in response.aiter_lines():
                if first is None and '"content"' in line:
                    first = time.perf_counter() - start
                if '"usage"' in line and '"completion_tokens"' in line:
                    usage = json.loads(line[6:])["usage"]
                    tokens = usage["completion_tokens"]
                    prompt_sizes.add(usage["prompt_tokens"])
        return first or float("nan"), tokens, time.perf_counter() - start

    results = {}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=100)) as client:
        await one(client, 0)
        for concurrency in (1, 32):
            start = time.perf_counter()
            runs = await asyncio.gather(*(one(client, i) for i in range(concurrency)))
            elapsed = time.perf_counter() - start
            results[concurrency] = {
                "aggregate_tok_s": sum(r[1] for r in runs) / elapsed,
                "ttft_ms_median": sorted(r[0] for r in runs)[len(runs) // 2] * 1e3,
            }
    results["prompt_tokens"] = sorted(prompt_sizes)
    return results
