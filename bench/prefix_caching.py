"""Prefix caching under RAG-shaped load, on and off, side by side in one run: ``ragllm serve`` started
twice (the response cache off both times, so every answer is generated), driven by the project's
load generator with 32 document sets reused at a rate of 0.8. Reports each run's time to first token
for requests whose documents were sent before and for first sends, the share of the repeats' prompt
tokens the server reported cached, and from /metrics its prefix-cache hit rate and its hits against
the repeats' prompt tokens (hits come from repeats, but for a template block shared by all).

    python bench/prefix_caching.py [--requests 120] [--concurrency 1] [--json bench/results/prefix_caching.json]

Extra ``RAGLLM_*`` settings for both servers go through ``--env KEY=VALUE``. On a GPU,
``--random-architecture qwen2.5-1.5b --tokenizer-from DIR`` serves random weights of that architecture
with a real tokenizer's files copied from DIR (the random checkpoints' own word-level tokenizer
maps every English word to one unknown token, so every document set would look the same).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.server import served  # noqa: E402
from ragllm.loadtest.generator import Bounds, run_level  # noqa: E402
from ragllm.loadtest.workload import Workload  # noqa: E402
from ragllm.testing.random_checkpoints import ARCHITECTURES, build_random_checkpoint  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--doc-sets", type=int, default=32)
    parser.add_argument("--repeat-rate", type=float, default=0.8)
    parser.add_argument("--context-words", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for both servers")
    parser.add_argument(
        "--random-architecture", choices=sorted(ARCHITECTURES), help="serve random weights on CUDA"
    )
    parser.add_argument(
        "--tokenizer-from",
        type=Path,
        help="tokenizer.json, tokenizer_config.json and chat_template.jinja for the random weights",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/ragllm-bench-models"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/prefix_caching.json"))
    return parser.parse_args()


def random_model_env(args: argparse.Namespace) -> dict[str, str]:
    directory = args.model_dir / f"{args.random_architecture}-{args.tokenizer_from.name}"
    # The vocabulary is the tokenizer's, so that every token the random weights choose has text.
    tokenizer = json.loads((args.tokenizer_from / "tokenizer.json").read_text())
    vocab_size = len(
        tokenizer["model"]["vocab"]
        | {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    )
    build_random_checkpoint(args.random_architecture, directory, vocab_size=vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (args.tokenizer_from / name).is_file():
            shutil.copy(args.tokenizer_from / name, directory / name)
    return {
        "RAGLLM_ENGINE__MODEL": str(directory),
        "RAGLLM_ENGINE__DEVICE": "cuda",
        "RAGLLM_ENGINE__DTYPE": "bfloat16",
    }


def run(args: argparse.Namespace, prefix_caching: bool) -> dict:
    env = dict(item.split("=", 1) for item in args.env)
    if args.random_architecture:
        env.update(random_model_env(args))
    env.update(
        {
            "RAGLLM_ENGINE__ENABLE_PREFIX_CACHING": str(prefix_caching).lower(),
            "RAGLLM_CACHE__ENABLED": "false",
        }
    )
    with served(env) as url:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        workload = Workload(
            model=model,
            max_tokens=args.max_tokens,
            context_words=args.context_words,
            doc_sets=args.doc_sets,
            repeat_rate=args.repeat_rate,
            seed=0,
        )
        # One request first, not counted: the first prefill pays for lazy initialisation.
        asyncio.run(
            run_level(
                url,
                Workload(model=model, max_tokens=2, context_words=20, doc_sets=1),
                Bounds(requests=1),
                concurrency=1,
            )
        )
        return asyncio.run(
            run_level(url, workload, Bounds(requests=args.requests), concurrency=args.concurrency)
        )


def main() -> None:
    args = parse_args()
    levels = {"on": run(args, True), "off": run(args, False)}
    print(
        f"{'prefix caching':<16}{'ok':>5}{'repeats':>9}{'TTFT p50 repeat':>17}{'TTFT p50 first':>16}"
        f"{'cached share':>14}{'hit rate':>10}{'hits/repeats':>14}"
    )
    for name, level in levels.items():
        share, rate = level.get("repeated_cached_share"), level.get("prefix_cache_hit_rate")
        hits = level.get("prefix_cache_hits", 0) / level["repeated_prompt_tokens"]
        level["hits_over_repeated_prompt_tokens"] = round(hits, 4)
        print(
            f"{name:<16}{level['completed']:>5}{level.get('repeated', 0):>9}"
            f"{level['ttft_repeated_ms']['p50']:>14.1f} ms{level['ttft_first_ms']['p50']:>13.1f} ms"
            f"{'-' if share is None else f'{share:.1%}':>14}{'-' if rate is None else f'{rate:.1%}':>10}"
            f"{hits:>14.1%}"
        )
    ratio = levels["off"]["ttft_repeated_ms"]["p50"] / levels["on"]["ttft_repeated_ms"]["p50"]
    print(f"repeated requests' median time to first token: {ratio:.1f}x lower with prefix caching")
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "levels": levels,
        "repeated_ttft_ratio": round(ratio, 2),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
