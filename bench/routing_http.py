"""The routing simulation's HTTP form: the same replica model served over HTTP
(``bench/replica_server.py``, one process per replica), the real gateway (``ragllm serve --engine
upstream``) in front, and the same arrivals sent through it; then the in-process form
(``ragllm/testing/routing_simulation.py``) on the same arrivals, side by side, to show the fast form
predicts the real one.

Time is stretched by ``--time-scale`` on the HTTP side (every step of the model takes that much
longer, arrivals come that much slower), so that one 2-core machine can host the replicas, the
gateway and the load; times are reported back in the model's seconds. Load balance is each replica's
running plus waiting requests, sampled from its /metrics every 0.2 s and averaged over the run.

    python bench/routing_http.py [--replicas 8,16] [--duration 6] [--time-scale 10] [--output-tokens 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gateway_overhead import wait_ready  # noqa: E402
from bench.server import unwind_on_sigterm  # noqa: E402
from ragllm.testing.routing_simulation import Load, arrivals, simulate  # noqa: E402

FILLER = "retrieved passage text "  # 23 characters; a prompt token is modelled as 4 characters


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="8,16")
    parser.add_argument(
        "--duration", type=float, default=6.0, help="seconds of arrivals, model time"
    )
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--output-tokens", type=int, default=50)
    parser.add_argument("--rate-per-replica", type=float, default=Load.rate_per_replica)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/routing_http.json"))
    return parser.parse_args()


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def document(doc_set: int, tokens: int) -> str:
    head = f"document set {doc_set}: "
    return head + FILLER * ((4 * tokens - len(head)) // len(FILLER) + 1)


async def drive(
    gateway: str,
    replica_urls: list[str],
    load: Load,
    replicas: int,
    duration: float,
    scale: float,
    seed: int,
) -> dict:
    requests = arrivals(replicas, duration, load, seed)
    ttfts: list[float] = []
    failures: list[str] = []
    samples: dict[str, list[float]] = {url: [] for url in replica_urls}
    done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:

        async def one(request) -> None:
            await asyncio.sleep(max(0.0, request.arrival * scale - (time.monotonic() - started)))
            body = {
                "model": "replica-model",
                "max_tokens": load.output_tokens,
                "stream": True,
                "messages": [
                    {"role": "system", "content": document(request.doc_set, load.doc_tokens)},
                    {"role": "user", "content": "q " * load.question_tokens},
                ],
            }
            sent = time.monotonic()
            try:
                async with session.post(
                    f"{gateway}/v1/chat/completions",
                    json=body,
                    headers={"cache-control": "no-store"},
                ) as response:
                    first = None
                    async for line in response.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.monotonic()
                    if response.status != 200 or first is None:
                        failures.append(f"HTTP {response.status}")
                        return
                    ttfts.append((first - sent) / scale)
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

        async def sample() -> None:
            while not done.is_set():
                for url in replica_urls:
                    async with session.get(f"{url}/metrics") as response:
                        text = await response.text()
                    values = dict(
                        line.split()
                        for line in text.splitlines()
                        if line and not line.startswith("#")
                    )
                    samples[url].append(
                        float(values["vllm:num_requests_running"])
                        + float(values["vllm:num_requests_waiting"])
                    )
                await asyncio.sleep(0.2)

        started = time.monotonic()
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(one(request) for request in requests))
        done.set()
        await sampler
        hits = lookups = 0
        for url in replica_urls:
            async with session.get(f"{url}/metrics") as response:
                values = dict(line.split() for line in (await response.text()).splitlines() if line)
            hits += float(values["vllm:prefix_cache_hits_total"])
            lookups += float(values["vllm:prefix_cache_queries_total"])
    averages = [statistics.fmean(values) for values in samples.values()]
    ttfts.sort()
    return {
        "requests": len(requests),
        "failed": len(failures),
        "failures": failures[:5],
        "ttft_p50_ms": ttfts[len(ttfts) // 2] * 1e3 if ttfts else None,
        "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1e3 if ttfts else None,
        "hit_rate": hits / lookups if lookups else 0.0,
        "max_over_mean_load": max(averages) / statistics.fmean(averages)
        if statistics.fmean(averages)
        else 0.0,
    }


def run_http(replicas: int, load: Load, args: argparse.Namespace, log_dir: Path) -> dict:
    ports = free_ports(replicas + 1)
    urls = [f"http://127.0.0.1:{port}" for port in ports[:replicas]]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "bench/replica_server.py",
                "--port",
                str(port),
                "--time-scale",
                str(args.time_scale),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for port in ports[:replicas]
    ]
    gateway_url = f"http://127.0.0.1:{ports[-1]}"
    log = open(log_dir / f"gateway-{replicas}.log", "wb")
    processes.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ragllm.cli",
                "serve",
                "--engine",
                "upstream",
                "--port",
                str(ports[-1]),
            ],
            env={
                **os.environ,
                "RAGLLM_UPSTREAM__URLS": ",".join(urls),
                "RAGLLM_CACHE__ENABLED": "false",
                "RAGLLM_ENGINE__MAX_WAITING": "4096",
                "RAGLLM_ENGINE__MAX_NUM_SEQS": "4096",
                "RAGLLM_SERVER__LOG_REQUESTS": "false",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )

    async def main() -> dict:
        for url in [*urls, gateway_url]:
            await wait_ready(url, "/health", {})
        return await drive(
            gateway_url, urls, load, replicas, args.duration, args.time_scale, args.seed
        )

    try:
        return asyncio.run(main())
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def main() -> None:
    unwind_on_sigterm()
    args = parse_args()
    load = replace(Load(), rate_per_replica=args.rate_per_replica, output_tokens=args.output_tokens)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(
        tempfile.mkdtemp(prefix="routing-http-")
    )  # the gateways' logs, if a run goes wrong
    print(f"gateway logs in {log_dir}")
    report: dict = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "load": vars(load),
        "results": {},
    }
    print(
        f"{'replicas':>8} {'form':<12}{'TTFT p50':>10}{'TTFT p99':>10}{'hit rate':>10}{'max/mean':>10}{'failed':>8}"
    )
    for replicas in (int(n) for n in args.replicas.split(",")):
        http = run_http(replicas, load, args, log_dir)
        modelled = simulate("ours", replicas, "zipf", args.duration, load, slack=2, seed=args.seed)
        report["results"][replicas] = {
            "http": http,
            "in_process": modelled,
            "hit_rate_difference": http["hit_rate"] - modelled["hit_rate"],
            "load_balance_difference": http["max_over_mean_load"] - modelled["max_over_mean_load"],
        }
        for form, r in (("http", http), ("in process", modelled)):
            print(
                f"{replicas:>8} {form:<12}{r['ttft_p50_ms']:>8.0f}ms{r['ttft_p99_ms']:>8.0f}ms{r['hit_rate']:>10.1%}"
                f"{r['max_over_mean_load']:>10.2f}{r.get('failed', 0):>8}",
                flush=True,
            )
        args.json.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
