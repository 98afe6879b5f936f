"""The ``ragllm`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ragllm.cli import loadtest, serve, stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragllm", description="OpenAI-compatible completions for RAG."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    stats.add_parser(commands)
    loadtest.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
