"""Starting real ``ragllm serve`` processes on loopback for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 300  # the first start on a fresh machine converts the packaged model (~20 s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        port: int | None = None,
        command: tuple[str, ...] = ("-m", "ragllm.cli", "serve"),
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = (log_dir or Path("/tmp")) / f"ragllm-serve-{self.port}.log"
        command = [sys.executable, *command, "--port", str(self.port), *args]
        self._log = open(self._log_path, "wb")
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until(self, predicate, timeout_s: float = READY_TIMEOUT_S) -> httpx.Response:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/health", timeout=2)
                if predicate(response):
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"server not in the expected state after {timeout_s}s:\n{self.log_tail()}"
        )

    def wait_ready(self) -> ServerProcess:
        self.wait_until(lambda response: response.status_code == 200)
        return self

    def log_tail(self) -> str:
        return self.log_tail_full()[-4000:]

    def log_tail_full(self) -> str:
        return self._log_path.read_text(errors="replace")

    def kill(self) -> None:
        """A crash: SIGKILL, no graceful shutdown."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def send_chat_raw(url: str, body: dict, small_window: bool = False) -> socket.socket:
    """A chat request (no cache) on a raw connection, so the test decides to the moment when the
    client leaves (an HTTP client returns only once response headers arrive: with the first token, or
    the whole answer). The caller closes the connection.

    ``small_window``: a 1,024-byte receive buffer and 1,000-byte segments, so the server's kernel send
    buffer stays small too and a client that reads slowly (or not at all) soon blocks the server's writes."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    connection = socket.socket()
    if small_window:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
    connection.connect((host, int(port)))
    connection.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Cache-Control: no-cache, no-store\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    )
    return connection


def metric_value(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text (all label sets)."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total


class RedisServer:
    """A redis-server of the test's own on a free port, persisting every write (so a kill loses none)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> RedisServer:
        """After a kill: the same port and data directory (what was persisted comes back)."""
        self.kill()
        return self.start()


def wait_clear_of_window_edge() -> None:
    """Rate limits count per clock minute; keep a short test from straddling two windows."""
    into_minute = time.time() % 60
    if into_minute > 55:
        time.sleep(60 - into_minute + 0.1)
