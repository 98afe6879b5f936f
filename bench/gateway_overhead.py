"""What a gateway adds in front of a fast upstream: the stub reached directly, through
`ragllm serve --engine upstream` (API keys and metrics on), and through LiteLLM's proxy.

Gateways run pinned to core 0; the stub and this load generator share core 1, so every gateway
gets one whole core. Measured, side by side in one run:
  - added p50/p99 latency at concurrency 1: non-streaming, and time to first streamed token;
  - requests/s sustained at concurrency 64 (closed loop, non-streaming);
  - CPU microseconds per forwarded stream event: the gateway's CPU time over streams of 64 and 4
    tokens, the difference divided by the difference in events (fixed per-request costs cancel).

``--pace-ms N`` has the stub write one event per write, N ms apart, as vLLM streams (otherwise a whole
stream arrives in one write and the per-event figure is a best case); the CPU-per-event streams then
run 64 at a time so that the series takes seconds, not minutes.

    python bench/gateway_overhead.py [--litellm .bench-venvs/litellm/bin/litellm] [--pace-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.server import stop, unwind_on_sigterm  # noqa: E402

GATEWAY_CORE, CLIENT_CORE = 0, 1
API_KEY = "bench-secret-key"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(core: int):
    return lambda: os.sched_setaffinity(0, {core})


@dataclass
class Target:
    name: str
    url: str
    model: str
    process: subprocess.Popen | None = None  # whose CPU time is the gateway's (None: direct)
    results: dict = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """utime + stime of the gateway process and its children (LiteLLM may fork)."""
        if self.process is None:
            return 0.0
        total = 0.0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError):
                pass
        return total


def _children(pid: int) -> list[int]:
    try:
        found = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return found + [grand for child in found for grand in _children(child)]


def start(command: list[str], core: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    unwind_on_sigterm()
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pinned(core),
        start_new_session=True,
    )


async def wait_ready(url: str, path: str, headers: dict, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(headers=headers) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + path) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url}{path} not ready")


async def one_request(
    session: aiohttp.ClientSession, target: Target, stream: bool, tokens: int
) -> float:
    """Seconds to the whole answer (non-streaming) or to the first content event (streaming)."""
    body = {
        "model": target.model,
        "messages": MESSAGES,
        "max_tokens": tokens,
        "temperature": 0.7,
        "stream": stream,
    }
    started = time.perf_counter()
    async with session.post(f"{target.url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(
                f"{target.name}: HTTP {response.status}: {(await response.text())[:300]}"
            )
        if not stream:
            await response.read()
            return time.perf_counter() - started
        first = None
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - started
        return first if first is not None else float("nan")


async def latency(session, target: Target, stream: bool, count: int) -> list[float]:
    for _ in range(20):  # warm-up: connections, caches, JIT-free but lazy imports
        await one_request(session, target, stream, 16)
    return [await one_request(session, target, stream, 16) for _ in range(count)]


async def throughput(session, target: Target, concurrency: int, duration_s: float) -> float:
    done = 0
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one_request(session, target, False, 16)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def cpu_per_event(session, target: Target, streams: int, concurrency: int) -> float | None:
    if target.process is None:
        return None
    spent = {}
    for tokens in (4, 64):
        before = target.cpu_seconds()
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                await one_request(session, target, True, tokens)

        await asyncio.gather(*(one() for _ in range(streams)))
        spent[tokens] = target.cpu_seconds() - before
    return (spent[64] - spent[4]) / (streams * (64 - 4)) * 1e6


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(target: Target, args: argparse.Namespace) -> None:
    headers = {"authorization": f"Bearer {API_KEY}", "cache-control": "no-store"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        plain = await latency(session, target, False, args.requests)
        streamed = await latency(session, target, True, args.requests)
        rps = await throughput(session, target, 64, args.duration)
        per_event = await cpu_per_event(session, target, args.streams, 64 if args.pace_ms else 8)
    target.results = {
        "p50_ms": statistics.median(plain) * 1e3,
        "p99_ms": percentile(plain, 0.99) * 1e3,
        "ttft_p50_ms": statistics.median(streamed) * 1e3,
        "ttft_p99_ms": percentile(streamed, 0.99) * 1e3,
        "rps_c64": rps,
        "cpu_us_per_event": per_event,
    }


def litellm_config(directory: Path, stub_url: str) -> Path:
    path = directory / "litellm.yaml"
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "model_list": [
                    {
                        "model_name": "stub",
                        "litellm_params": {
                            "model": "openai/stub",
                            "api_base": f"{stub_url}/v1",
                            "api_key": "none",
                        },
                    }
                ],
                "general_settings": {"master_key": API_KEY},
                "litellm_settings": {"telemetry": False, "drop_params": True},
            }
        )
    )
    return path


async def main() -> None:
    parser = argparse.ArgumentParser(description="gateway overhead: direct vs ragllm vs LiteLLM")
    parser.add_argument(
        "--requests", type=int, default=1000, help="sequential requests per latency series"
    )
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds of the concurrency-64 run"
    )
    parser.add_argument("--streams", type=int, default=300, help="streams per CPU-per-event series")
    parser.add_argument(
        "--litellm", default=shutil.which("litellm"), help="LiteLLM's CLI (skipped if absent)"
    )
    parser.add_argument(
        "--pace-ms", type=float, default=0.0, help="the stub's interval between stream events"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/gateway_overhead.json")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CORE})

    stub_port = free_port()
    stub_url = f"http://127.0.0.1:{stub_port}"
    processes = [
        start(
            [
                sys.executable,
                str(ROOT / "bench/stub_upstream.py"),
                "--port",
                str(stub_port),
                "--pace-ms",
                str(args.pace_ms),
            ],
            CLIENT_CORE,
        )
    ]
    targets = [Target("direct", stub_url, "stub")]
    try:
        ragllm_port = free_port()
        ragllm = start(
            [
                sys.executable,
                "-m",
                "ragllm.cli",
                "serve",
                "--engine",
                "upstream",
                "--port",
                str(ragllm_port),
            ],
            GATEWAY_CORE,
            env={
                "RAGLLM_UPSTREAM__URLS": stub_url,
                "RAGLLM_AUTH__REQUIRED": "true",
                "RAGLLM_AUTH__KEYS": f"bench:{API_KEY}",
                "RAGLLM_SERVER__LOG_LEVEL": "warning",
            },
        )
        processes.append(ragllm)
        targets.append(Target("ragllm upstream", f"http://127.0.0.1:{ragllm_port}", "stub", ragllm))
        # Whole answers asked for as one JSON (the default streams them, for billing a client that leaves).
        one_json_port = free_port()
        one_json = start(
            [
                sys.executable,
                "-m",
                "ragllm.cli",
                "serve",
                "--engine",
                "upstream",
                "--port",
                str(one_json_port),
            ],
            GATEWAY_CORE,
            env={
                "RAGLLM_UPSTREAM__URLS": stub_url,
                "RAGLLM_AUTH__REQUIRED": "true",
                "RAGLLM_AUTH__KEYS": f"bench:{API_KEY}",
                "RAGLLM_SERVER__LOG_LEVEL": "warning",
                "RAGLLM_UPSTREAM__STREAM_WHOLE_ANSWERS": "false",
            },
        )
        processes.append(one_json)
        targets.append(
            Target(
                "ragllm upstream, one JSON", f"http://127.0.0.1:{one_json_port}", "stub", one_json
            )
        )
        if args.litellm:
            workdir = Path(tempfile.mkdtemp(prefix="litellm-bench-"))
            litellm_port = free_port()
            litellm = start(
                [
                    args.litellm,
                    "--config",
                    str(litellm_config(workdir, stub_url)),
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    "1",
                ],
                GATEWAY_CORE,
                env={"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"},
            )
            processes.append(litellm)
            targets.append(Target("LiteLLM", f"http://127.0.0.1:{litellm_port}", "stub", litellm))
        for target in targets:
            ready_path = "/health/liveliness" if target.name.startswith("LiteLLM") else "/health"
            await wait_ready(target.url, ready_path, {"authorization": f"Bearer {API_KEY}"})
        for target in targets:  # one at a time: each gateway has core 0 to itself while measured
            await measure(target, args)
    finally:
        for process in processes:
            stop(process, timeout_s=15)
    report(targets, args.output, args.pace_ms)


def report(targets: list[Target], output: Path, pace_ms: float = 0.0) -> None:
    direct = targets[0].results
    table = Table(
        title="Gateway overhead (stub upstream; gateway on core 0, stub + client on core 1)"
    )
    for column in (
        "target",
        "p50 ms",
        "added p50 ms",
        "p99 ms",
        "TTFT p50 ms",
        "added TTFT ms",
        "req/s @64",
        "CPU µs/event",
    ):
        table.add_column(column, justify="right" if column != "target" else "left")
    for target in targets:
        r = target.results
        table.add_row(
            target.name,
            f"{r['p50_ms']:.2f}",
            f"{r['p50_ms'] - direct['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['ttft_p50_ms']:.2f}",
            f"{r['ttft_p50_ms'] - direct['ttft_p50_ms']:.2f}",
            f"{r['rps_c64']:.0f}",
            "-" if r["cpu_us_per_event"] is None else f"{r['cpu_us_per_event']:.0f}",
        )
    Console().print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"name": t.name, "url": t.url, **t.results} for t in targets]
    output.write_text(
        json.dumps({"cpu_count": os.cpu_count(), "pace_ms": pace_ms, "targets": rows}, indent=2)
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    asyncio.run(main())
