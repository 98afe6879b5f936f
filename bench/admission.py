"""Fair admission: a long prompt's time to first token alone and while three answers stream, and the
streams' pauses meanwhile, for each prefill cap while decoding (one server per cap, measured in turn).

    python bench/admission.py [--prompt-tokens 3300 6000] [--caps default 1024]

A cap of 1024 (the local profile's whole step) is the policy before the cap existed. Every prompt is
sent with a fresh ``cache_salt``, so it is computed every time, never found in the prefix cache.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from bench.server import served  # noqa: E402
from ragllm.config import DEFAULT_MODEL as MODEL  # noqa: E402

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
NUM_STREAMS = 3
STREAM_TOKENS = 200


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[3300, 6000])
    parser.add_argument(
        "--caps",
        nargs="+",
        default=["default", "1024"],
        help="RAGLLM_ENGINE__MAX_PREFILL_TOKENS_WHILE_DECODING values; 'default': unset",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/admission.json"))
    return parser.parse_args()


def long_prompt(url: str, target_tokens: int) -> str:
    """Distinct sentences, the longest run of them within ``target_tokens`` tokens."""
    sentences = [
        f"Record {i}: the warehouse in district {i * 37 % 101} shipped {i * 13 % 89} crates "
        f"of item {i * 7 % 53} on day {i % 28 + 1}."
        for i in range(target_tokens // 5)
    ]
    low, high = 1, len(sentences)
    while low < high:
        middle = (low + high + 1) // 2
        count = httpx.post(
            f"{url}/tokenize", json={"model": MODEL, "prompt": " ".join(sentences[:middle])}
        )
        low, high = (middle, high) if count.json()["count"] <= target_tokens else (low, middle - 1)
    return " ".join(sentences[:low])


def first_token_s(url: str, prompt: str) -> float:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
        "cache_salt": uuid.uuid4().hex,
    }
    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers=NO_CACHE, timeout=300
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                return time.perf_counter() - started
    raise RuntimeError(f"no token arrived ({response.status_code})")


def stream(url: str, index: int, started: threading.Event, gaps: list[float]) -> None:
    """One answer of STREAM_TOKENS tokens; the pauses between its tokens go into ``gaps``."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write a long story about ship {index}."}],
        "max_tokens": STREAM_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    last = None
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=NO_CACHE, timeout=300
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                started.set()


def measure(url: str, prompt: str) -> dict[str, float]:
    alone = first_token_s(url, prompt)
    gaps: list[float] = []
    started = [threading.Event() for _ in range(NUM_STREAMS)]
    with concurrent.futures.ThreadPoolExecutor(NUM_STREAMS) as pool:
        streams = [pool.submit(stream, url, i, started[i], gaps) for i in range(NUM_STREAMS)]
        if not all(event.wait(120) for event in started):
            raise RuntimeError("the streams did not start")
        under_load = first_token_s(url, prompt)
        for future in streams:
            future.result()
    gaps.sort()
    return {
        "alone_s": round(alone, 2),
        "under_load_s": round(under_load, 2),
        "ratio": round(under_load / alone, 2),
        "stream_gap_p50_s": round(statistics.median(gaps), 3),
        "stream_gap_max_s": round(gaps[-1], 3),
    }


def main() -> None:
    args = parse_args()
    report = {
        "benchmark": "admission",
        "model": MODEL,
        "streams": NUM_STREAMS,
        "stream_tokens": STREAM_TOKENS,
        "rows": [],
    }
    for cap in args.caps:
        env = {} if cap == "default" else {"RAGLLM_ENGINE__MAX_PREFILL_TOKENS_WHILE_DECODING": cap}
        with served(env) as url:
            for target in args.prompt_tokens:
                prompt = long_prompt(url, target)
                tokens = httpx.post(
                    f"{url}/tokenize", json={"model": MODEL, "prompt": prompt}
                ).json()["count"]
                row = {"cap": cap, "prompt_tokens": tokens, **measure(url, prompt)}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    write_report(args.json, report)


if __name__ == "__main__":
    main()
