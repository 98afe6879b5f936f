"""A stand-in for `vllm serve` on machines without a GPU: parses the flags the ``vllm`` engine passes
(refusing any vLLM does not document) and becomes a `ragllm serve` of the packaged model on that port.

Set ``VLLM_STANDIN_PID_FILE`` to learn the child's pid (it survives the exec).
"""

from __future__ import annotations

import argparse
import os
import sys

# `vllm serve --help` (vLLM's CLI reference): the flags rag-llm-service uses, and whether each takes
# a value. --model is vLLM's older spelling of the positional model, still accepted; compose uses it.
DOCUMENTED: dict[str, bool] = {
    "--model": True,
    "--host": True,
    "--port": True,
    "--served-model-name": True,
    "--download-dir": True,
    "--tensor-parallel-size": True,
    "--max-num-seqs": True,
    "--max-num-batched-tokens": True,
    "--gpu-memory-utilization": True,
    "--enable-prompt-tokens-details": False,
    "--enable-chunked-prefill": False,
    "--max-model-len": True,
    "--quantization": True,
    "--kv-cache-dtype": True,
    "--otlp-traces-endpoint": True,
    "--block-size": True,
    "--no-enable-prefix-caching": False,
    "--num-gpu-blocks-override": True,
    "--kv-cache-memory-bytes": True,
}


def flag_values(args: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs (None for a switch); AssertionError on a flag vLLM does not document."""
    flags: dict[str, str | None] = {}
    index = 0
    while index < len(args):
        flag = args[index]
        assert flag in DOCUMENTED, f"not a documented vllm serve flag: {flag}"
        flags[flag] = args[index + 1] if DOCUMENTED[flag] else None
        index += 2 if DOCUMENTED[flag] else 1
    return flags


def parse(argv: list[str]) -> argparse.Namespace:
    """vLLM's `serve` flags as the engine uses them; exits 2 on one vLLM would not know either."""
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    for flag, takes_value in DOCUMENTED.items():
        if flag != "--model":
            parser.add_argument(flag, **({} if takes_value else {"action": "store_true"}))
    return parser.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    if pid_file := os.environ.get("VLLM_STANDIN_PID_FILE"):
        with open(pid_file, "w") as handle:
            handle.write(str(os.getpid()))
    argv = [
        sys.executable,
        "-m",
        "ragllm.cli",
        "serve",
        "--engine",
        "transformers",
        "--host",
        args.host,
        "--port",
        args.port,
        "--model",
        args.model,
    ]
    if args.served_model_name:
        argv += ["--served-model-name", args.served_model_name]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
