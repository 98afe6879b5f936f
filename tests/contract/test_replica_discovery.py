"""Replicas behind one name (``dns+http://name:port``), as a Kubernetes headless Service presents
them: the gateway follows the name's addresses within one probe interval as replicas appear and
disappear, and no request is lost. The replicas are models of a vLLM replica
(``bench/replica_server.py``) on three loopback addresses sharing one port; the name resolves
through a resolver the test controls."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from ragllm.app import create_app
from ragllm.config import load_settings
from ragllm.engines.upstream.engine import UpstreamEngine
from tests.support.servers import free_port

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
PROBE_INTERVAL_S = 0.3
DOCUMENTS = "Retrieved document text about the Verdant Bridge. " * 40


@pytest.fixture
def replicas():
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "bench/replica_server.py",
                "--host",
                address,
                "--port",
                str(port),
                "--time-scale",
                "5",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for address in ADDRESSES
    ]
    try:
        for address in ADDRESSES:
            _wait_up(f"http://{address}:{port}")
        yield port
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def _wait_up(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} never came up")


class Gateway:
    """``ragllm serve --engine upstream`` in this process (so the test can hand it a resolver)."""

    def __init__(self, monkeypatch, port: int, answer: list[str]) -> None:
        import uvicorn

        monkeypatch.setenv("RAGLLM_ENGINE__NAME", "upstream")
        monkeypatch.setenv("RAGLLM_UPSTREAM__URLS", f"dns+http://replicas.test:{port}")
        monkeypatch.setenv("RAGLLM_UPSTREAM__PROBE_INTERVAL_S", str(PROBE_INTERVAL_S))
        monkeypatch.setenv("RAGLLM_CACHE__ENABLED", "false")
        settings = load_settings()

        async def resolve(host: str, resolved_port: int) -> list[str]:
            assert host == "replicas.test" and resolved_port == port
            return list(answer)

        self.engine = UpstreamEngine(settings.engine, settings.upstream, resolve=resolve)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, self.engine),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_up(self.url)

    def replica_urls(self) -> list[str]:
        return [replica.url for replica in self.engine.pool.replicas]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class Load:
    """Chat requests one after another on two threads, each a different document set, until stopped."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed, self._stop = url, 0, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(worker,)) for worker in range(2)]
        for thread in self.threads:
            thread.start()

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=30) as client:
            index = 0
            while not self._stop.is_set():
                index += 1
                body = {
                    "model": "replica-model",
                    "max_tokens": 8,
                    "stream": True,
                    "messages": [
                        {"role": "system", "content": f"set {worker}-{index % 7}: {DOCUMENTS}"},
                        {"role": "user", "content": "When was the bridge completed?"},
                    ],
                }
                try:
                    with client.stream(
                        "POST", f"{self.url}/v1/chat/completions", json=body
                    ) as response:
                        text = "".join(response.iter_lines())
                    if response.status_code == 200 and "[DONE]" in text:
                        self.ok += 1
                    else:
                        self.failed.append(f"{response.status_code}: {text[:200]}")
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def _served(port: int) -> dict[str, float]:
    counts = {}
    for address in ADDRESSES:
        text = httpx.get(f"http://{address}:{port}/metrics").text
        counts[address] = float(
            next(
                line.split()[1]
                for line in text.splitlines()
                if line.startswith("replica_model_requests_total")
            )
        )
    return counts


def _within_one_interval(predicate, what: str) -> float:
    """Seconds until ``predicate()`` holds; fails past one probe interval (and the probe's own time)."""
    started = time.monotonic()
    while time.monotonic() - started < PROBE_INTERVAL_S + 0.5:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not within one probe interval: {what}")


def test_the_pool_follows_the_names_addresses_and_loses_no_request(replicas, monkeypatch):
    port = replicas
    answer = [ADDRESSES[0]]
    gateway = Gateway(monkeypatch, port, answer)
    load = None
    try:
        assert gateway.replica_urls() == [f"http://{ADDRESSES[0]}:{port}"]
        load = Load(gateway.url)
        time.sleep(0.5)
        answer[:] = ADDRESSES  # two replicas join
        _within_one_interval(lambda: len(gateway.replica_urls()) == 3, "three replicas")
        deadline = time.monotonic() + 10
        while min(_served(port).values()) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert min(_served(port).values()) > 0  # every joined replica takes traffic
        answer[:] = [ADDRESSES[1]]  # two leave (requests in flight there finish there)
        _within_one_interval(
            lambda: gateway.replica_urls() == [f"http://{ADDRESSES[1]}:{port}"], "one replica"
        )
        time.sleep(0.5)  # let requests already sent to the leavers finish
        before = _served(port)
        time.sleep(1.0)
        after = _served(port)
        assert (
            after[ADDRESSES[0]] == before[ADDRESSES[0]]
            and after[ADDRESSES[2]] == before[ADDRESSES[2]]
        )
        assert after[ADDRESSES[1]] > before[ADDRESSES[1]]
    finally:
        if load is not None:
            load.stop()
        gateway.stop()
    assert load.ok > 20 and load.failed == []


def test_a_name_that_stops_resolving_keeps_its_replicas(replicas, monkeypatch):
    port = replicas
    answer = [ADDRESSES[0], ADDRESSES[1]]
    gateway = Gateway(monkeypatch, port, answer)
    try:
        assert len(gateway.replica_urls()) == 2

        async def failing(host: str, resolved_port: int) -> list[str]:
            raise OSError("temporary failure in name resolution")

        gateway.engine.discovery.resolve = failing
        time.sleep(3 * PROBE_INTERVAL_S)
        assert len(gateway.replica_urls()) == 2
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            timeout=30,
            json={
                "model": "replica-model",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert response.status_code == 200
    finally:
        gateway.stop()
