"""A ``ragllm serve`` of the packaged model on a free loopback port, for benchmarks that go through HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

READY_TIMEOUT_S = 300  # a fresh machine converts the packaged model first


def unwind_on_sigterm() -> None:
    """Let SIGTERM (a ``timeout`` running out, a stopped job) unwind the benchmark like an exception:
    servers it started in process groups of their own are then stopped on the way out, not left
    running (holding a port, cores, a GPU's memory). Only the main thread may set a handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))


@contextmanager
def served(env: dict[str, str] | None = None) -> Iterator[str]:
    """The server's base URL once it is ready; stopped (SIGTERM) on leaving, or when the benchmark is
    itself stopped by SIGTERM."""
    unwind_on_sigterm()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "ragllm.cli", "serve", "--port", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield _wait_ready(process, f"http://127.0.0.1:{port}")
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the process group, SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _wait_ready(process: subprocess.Popen, url: str) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ragllm serve at {url} did not become ready")
