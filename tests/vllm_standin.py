"""A stand-in for `vllm serve` on machines without a GPU: parses the flags the ``vllm`` engine passes
(refusing any vLLM does not document) and becomes a `ragllm serve` of the packaged model on that port.

Set ``VLLM_STANDIN_PID_FILE`` to learn the child's pid (it survives the exec).
"""

from __future__ import annotations

import argparse
import os
import sys

VALUE_FLAGS = ("--host", "--port", "--served-model-name", "--download-dir", "--tensor-parallel-size",
               "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--max-model-len",
               "--quantization", "--kv-cache-dtype", "--otlp-traces-endpoint")
SWITCHES = ("--enable-prompt-tokens-details", "--enable-chunked-prefill")


def parse(argv: list[str]) -> argparse.Namespace:
    """vLLM's `serve` flags as the engine uses them; exits 2 on one vLLM would not know either."""
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    for flag in VALUE_FLAGS:
        parser.add_argument(flag)
    for flag in SWITCHES:
        parser.add_argument(flag, action="store_true")
    return parser.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    if pid_file := os.environ.get("VLLM_STANDIN_PID_FILE"):
        with open(pid_file, "w") as handle:
            handle.write(str(os.getpid()))
    argv = [sys.executable, "-m", "ragllm.cli", "serve", "--engine", "transformers", "--host", args.host,
            "--port", args.port, "--model", args.model]
    if args.served_model_name:
        argv += ["--served-model-name", args.served_model_name]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
