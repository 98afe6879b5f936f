"""vLLM and this service side by side on one GPU: the same random weights, the same client, one run.

Each server is started in turn (``vllm serve`` with prefix caching, then ``ragllm serve``), driven by
the same closed-loop client spread over several processes (one Python process saturates near 8k
streamed tokens/s), and stopped. Workloads, all streamed, temperature 0:

- ladder: 1/32/128 streams of 128-token prompts and 256 tokens out (end-of-sequence ignored);
- first token after 2k and 8k tokens: one stream, distinct prompts (no prefix hit), median of 5;
- retrieval: ``--rag-streams`` streams, each request 8 documents of ~500 tokens drawn from a pool
  of 64 by zipf popularity, shuffled, and a question; 64 tokens out. vLLM gets the prompt this
  service renders (the same template, client-side); this service gets the documents, with document
  KV reuse on and off;
- reused documents: one stream; a document set is sent once, then its documents in another order
  are timed to the first token (vLLM: the same rendered prompts, prefix caching on).

    python bench/versus_vllm.py --vllm "DIR/vllm"                  # DIR from vllm-bundle.sh
    python bench/versus_vllm.py --vllm vllm --model-dir /tmp/qwen  # wherever vLLM is installed

Needs a CUDA GPU and a ``vllm`` command; builds the random Qwen2.5-1.5B checkpoint once.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.document_kv_reuse import document_pool  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.server import stop, unwind_on_sigterm  # noqa: E402
from ragllm.rag.prompt import load_template, render_messages  # noqa: E402
from ragllm.testing.random_checkpoints import build_random_checkpoint, word  # noqa: E402

SERVED_NAME = "bench"
MAX_MODEL_LEN = 16384
READY_TIMEOUT_S = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", default="vllm", help="the vllm command (a path or a name)")
    parser.add_argument("--model-dir", type=Path, default=Path("bench/results/models/qwen2.5-1.5b"))
    parser.add_argument("--ladder", default="1,32,128", help="stream counts")
    parser.add_argument("--rag-streams", type=int, default=16)
    parser.add_argument("--rag-requests", type=int, default=96)
    parser.add_argument("--doc-tokens", type=int, default=120, help="~500 random-tokenizer tokens")
    parser.add_argument("--reuse-sets", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8, help="client processes at most")
    parser.add_argument("--ttft-lengths", default="2000,8000", help="prompt tokens, one stream")
    parser.add_argument("--architecture", default="qwen2.5-1.5b", help="random weights of this")
    parser.add_argument("--device", default="cuda", help="ours: cuda, or cpu for a smoke run")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--json", type=Path, default=Path("bench/results/versus_vllm.json"))
    return parser.parse_args(argv)


# -- servers ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(command: list[str], env: dict[str, str], log: Path):
    """A server in its own process group, its base URL once /health answers 200; stopped after."""
    import httpx

    unwind_on_sigterm()
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited ({process.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} not ready in {READY_TIMEOUT_S} s; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield url
    finally:
        stop(process, timeout_s=60)


def vllm_command(args: argparse.Namespace) -> list[str]:
    return [
        *shlex.split(args.vllm),
        "serve",
        str(args.model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enable-prefix-caching",
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--max-num-seqs",
        "128",
    ]


def ragllm_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "ragllm.cli", "serve", "--model", str(args.model_dir)]
    command += ["--device", args.device, "--max-model-len", str(MAX_MODEL_LEN)]
    env = {
        "RAGLLM_ENGINE__SERVED_MODEL_NAME": SERVED_NAME,
        "RAGLLM_ENGINE__MAX_NUM_SEQS": "128",
        "RAGLLM_ENGINE__MAX_BATCH_SIZE": "128",
        "RAGLLM_ENGINE__MAX_NUM_BATCHED_TOKENS": "8192",
        "RAGLLM_ENGINE__MAX_WAITING": "1024",
        "RAGLLM_ENGINE__GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization),
        "RAGLLM_SERVER__LOG_REQUESTS": "false",
    }
    return command, env


# -- the client -------------------------------------------------------------------------------------
def run_streams(url: str, bodies: list[dict], streams: int, clients: int) -> list[dict]:
    """Closed loop: ``streams`` streams over ``clients`` processes, each stream sending its share of
    ``bodies`` one after another. One record per request: first token and end times, tokens."""
    clients = max(1, min(clients, streams))
    shares: list[list[list[dict]]] = [[] for _ in range(clients)]
    for stream in range(streams):
        shares[stream % clients].append(bodies[stream::streams])
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        parts = pool.starmap(_client_process, [(url, share) for share in shares if share])
    return [record for part in parts for record in part]


def _client_process(url: str, streams: list[list[dict]]) -> list[dict]:
    return asyncio.run(_client(url, streams))


async def _client(url: str, streams: list[list[dict]]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(streams) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def stream(bodies: list[dict]) -> list[dict]:
            return [await _one(client, body) for body in bodies]

        done = await asyncio.gather(*(stream(bodies) for bodies in streams))
    return [record for records in done for record in records]


async def _one(client, body: dict) -> dict:
    import json

    started = time.perf_counter()
    first, tokens = None, 0
    # No response cache: every request is generated (this service would answer a repeat from it).
    headers = {"Cache-Control": "no-cache, no-store"}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {
        "start": started,
        "first": first or time.perf_counter(),
        "end": time.perf_counter(),
        "tokens": tokens,
    }


def summary(records: list[dict]) -> dict:
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    ttft = sorted(1000 * (r["first"] - r["start"]) for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {
        "requests": len(records),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_ttft_ms": round(statistics.mean(ttft), 1),
        "median_ttft_ms": round(statistics.median(ttft), 1),
    }


# -- workloads --------------------------------------------------------------------------------------
def body(messages: list[dict], max_tokens: int, **extra) -> dict:
    return {
        "model": SERVED_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        **extra,
    }


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(word(rng.randrange(200, 20000)) for _ in range(count))


def ladder(url: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for streams in (int(s) for s in args.ladder.split(",")):
        bodies = [
            body([{"role": "user", "content": words(120, 1000 * streams + i)}], 256)
            for i in range(2 * streams)
        ]
        rows.append(
            {"streams": streams, **summary(run_streams(url, bodies, streams, args.clients))}
        )
    return rows


def first_token(url: str, args: argparse.Namespace) -> dict:
    result = {}
    for length in (int(n) for n in args.ttft_lengths.split(",")):
        runs = [
            run_streams(
                url, [body([{"role": "user", "content": words(length, 7 * length + i)}], 1)], 1, 1
            )[0]
            for i in range(6)
        ]
        result[f"ttft_ms_{length}"] = round(
            statistics.median(1000 * (r["first"] - r["start"]) for r in runs[1:]), 1
        )
    return result


def rag_request(documents, question, rendered: bool, reuse: bool, max_tokens: int) -> dict:
    """The same prompt two ways: rendered client-side (for vLLM), or as documents (for us), scored
    so that the service lays them out in the order given."""
    if rendered:
        template = load_template("default@1")
        question_turn = [{"role": "user", "content": question}]
        return body(render_messages(template, documents, question_turn), max_tokens)
    scored = [
        {"id": d.id, "title": d.title, "text": d.text, "score": float(len(documents) - i)}
        for i, d in enumerate(documents)
    ]
    rag = {"kv_reuse": reuse, "citations": False, "order": "relevance"}
    return body([{"role": "user", "content": question}], max_tokens, documents=scored, rag=rag)


def retrieval_traffic(args: argparse.Namespace, seed: int) -> list[tuple[list, str]]:
    rng = random.Random(seed)
    pool = document_pool(64, args.doc_tokens, rng)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(pool))]
    traffic = []
    for _ in range(args.rag_requests):
        chosen: dict[int, None] = {}
        while len(chosen) < 8:
            chosen[rng.choices(range(len(pool)), weights)[0]] = None
        order = list(chosen)
        rng.shuffle(order)
        traffic.append(([pool[i][0] for i in order], pool[rng.choice(order)][1]))
    return traffic


def retrieval(url: str, args: argparse.Namespace, rendered: bool, reuse: bool) -> dict:
    bodies = [
        rag_request(documents, question, rendered, reuse, 64)
        for documents, question in retrieval_traffic(args, seed=5)
    ]
    return summary(run_streams(url, bodies, args.rag_streams, args.clients))


def reused_documents(url: str, args: argparse.Namespace, rendered: bool, reuse: bool) -> dict:
    pool = document_pool(args.reuse_sets * 8, args.doc_tokens, random.Random(11))
    times = []
    for index in range(args.reuse_sets):
        documents = [pool[index * 8 + i][0] for i in range(8)]
        question = f"Which record is number {index}?"
        run_streams(url, [rag_request(documents, question, rendered, reuse, 1)], 1, 1)
        shuffled = documents[3:] + documents[:3]
        record = run_streams(url, [rag_request(shuffled, question, rendered, reuse, 1)], 1, 1)[0]
        times.append(1000 * (record["first"] - record["start"]))
    return {"median_ttft_ms": round(statistics.median(times), 1), "runs": len(times)}


def measure(url: str, args: argparse.Namespace, ours: bool) -> dict:
    run_streams(url, [body([{"role": "user", "content": words(64, 1)}], 8)], 1, 1)  # warm-up
    result = {"ladder": ladder(url, args), **first_token(url, args)}
    if ours:
        result["retrieval_reuse"] = retrieval(url, args, rendered=False, reuse=True)
        result["retrieval_plain"] = retrieval(url, args, rendered=False, reuse=False)
        result["reused_documents_reuse"] = reused_documents(url, args, rendered=False, reuse=True)
        result["reused_documents_plain"] = reused_documents(url, args, rendered=False, reuse=False)
    else:
        result["retrieval"] = retrieval(url, args, rendered=True, reuse=False)
        result["reused_documents"] = reused_documents(url, args, rendered=True, reuse=False)
    return result


def main(args: argparse.Namespace) -> dict:
    import torch

    build_random_checkpoint(args.architecture, args.model_dir)
    logs = args.json.parent
    logs.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "benchmark": "versus_vllm",
        "model": f"{args.architecture} (random weights)",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "machine": platform.processor() or platform.machine(),
        "clients": args.clients,
    }
    if not args.skip_vllm:
        try:
            with server(vllm_command(args), {}, logs / "versus_vllm-vllm.log") as url:
                report["vllm"] = measure(url, args, ours=False)
        except RuntimeError as error:  # still measure ours; the report says why vLLM is missing
            report["vllm_error"] = str(error)
        write_report(args.json, report)  # what is measured so far survives a later failure
    command, env = ragllm_command(args)
    with server(command, env, logs / "versus_vllm-ragllm.log") as url:
        report["ragllm"] = measure(url, args, ours=True)
    return report


def print_table(report: dict) -> None:
    sides = [name for name in ("vllm", "ragllm") if name in report]
    print(f"{report['device']}, {report['model']}")
    if "vllm_error" in report:
        print(f"vLLM not measured: {report['vllm_error']}")
    for index, streams in enumerate(report["ragllm"]["ladder"]):
        cells = [f"{report[s]['ladder'][index]['tokens_per_s']:>9}" for s in sides]
        print(f"ladder {streams['streams']:>3} streams tok/s  " + "  ".join(cells))
    for key in (k for k in report["ragllm"] if k.startswith("ttft_ms_")):
        print(f"{key:<28}" + "  ".join(f"{report[s][key]:>9}" for s in sides))
    ours = report["ragllm"]
    if "vllm" in report:
        vllm = report["vllm"]
        print(
            f"retrieval vLLM      mean TTFT {vllm['retrieval']['mean_ttft_ms']} ms, "
            f"{vllm['retrieval']['tokens_per_s']} tok/s"
        )
        print(f"reused documents vLLM  {vllm['reused_documents']['median_ttft_ms']} ms")
    for mode in ("reuse", "plain"):
        row = ours[f"retrieval_{mode}"]
        print(
            f"retrieval ours {mode:<5} mean TTFT {row['mean_ttft_ms']} ms, "
            f"{row['tokens_per_s']} tok/s"
        )
        print(
            f"reused documents ours {mode}  {ours[f'reused_documents_{mode}']['median_ttft_ms']} ms"
        )


if __name__ == "__main__":
    arguments = parse_args()
    result = main(arguments)
    print_table(result)
    write_report(arguments.json, result)
