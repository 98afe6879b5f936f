"""What the in-process engine benchmarks share: their command-line options and their prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from ragllm.config import DEFAULT_MODEL
from ragllm.testing.random_checkpoints import ARCHITECTURES


def add_engine_arguments(parser: argparse.ArgumentParser, concurrency: str, json_name: str) -> None:
    """The model (packaged, a path, or random weights), the load shape and where the JSON goes."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model id or path (default: packaged)"
    )
    parser.add_argument(
        "--random", choices=sorted(ARCHITECTURES), help="random weights of this architecture"
    )
    parser.add_argument("--random-dir", type=Path, default=Path("bench/results/models"))
    parser.add_argument("--concurrency", default=concurrency, help="comma-separated stream counts")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per stream")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", type=Path, default=Path("bench/results") / json_name)


def synthetic_prompt(length: int) -> list[int]:
    """The same token ids every run, valid for any vocabulary of 1,010 tokens or more."""
    return [(7 * i) % 1000 + 10 for i in range(length)]
