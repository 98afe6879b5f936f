"""Failover at 16 replicas: one replica killed under load loses no request that had not started
streaming; streams it was carrying end with an error event, never silently. The replicas are models
of a vLLM replica (``bench/replica_server.py``); the gateway is a real ``ragllm serve --engine upstream``."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.servers import ServerProcess, free_port

REPLICAS = 16
DOCUMENTS = "Retrieved passage about the Verdant Bridge and the ferry before it. " * 30


@pytest.fixture
def replicas():
    ports = [free_port() for _ in range(REPLICAS)]
    processes = [
        subprocess.Popen(
            [sys.executable, "bench/replica_server.py", "--port", str(port), "--time-scale", "20"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for port in ports
    ]
    try:
        yield ports, processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)


def _busiest(ports: list[int]) -> int:
    """The replica with the most requests running or waiting now (affinity may leave some idle)."""

    def load(port: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        values = dict(line.split() for line in text.splitlines() if line)
        return float(values["vllm:num_requests_running"]) + float(
            values["vllm:num_requests_waiting"]
        )

    loads = [load(port) for port in ports]
    assert max(loads) > 0
    return loads.index(max(loads))


def _stream(url: str, index: int) -> tuple[bool, bool]:
    """(whether the answer completed, whether any content had arrived before it ended)."""
    body = {
        "model": "replica-model",
        "max_tokens": 20,
        "stream": True,
        "messages": [
            {"role": "system", "content": f"document set {index % 24}: {DOCUMENTS}"},
            {"role": "user", "content": "When was the bridge completed?"},
        ],
    }
    started = False
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
    ):
        if response.status_code != 200:
            return False, False
        for line in response.iter_lines():
            if '"content"' in line:
                started = True
            if '"error"' in line:
                return False, started
            if line == "data: [DONE]":
                return True, started
    return False, started


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(replicas, tmp_path):
    ports, processes = replicas
    gateway = ServerProcess(
        "--engine",
        "upstream",
        log_dir=tmp_path,
        env={
            "RAGLLM_UPSTREAM__URLS": ",".join(f"http://127.0.0.1:{port}" for port in ports),
            "RAGLLM_UPSTREAM__PROBE_INTERVAL_S": "0.3",
            "RAGLLM_CACHE__ENABLED": "false",
            "RAGLLM_ENGINE__MAX_WAITING": "256",
        },
    )
    try:
        gateway.wait_until(lambda r: r.status_code == 200 and not r.json()["detail"])
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(_stream, gateway.url, index) for index in range(96)]
            while sum(f.done() for f in futures) < 24:
                time.sleep(0.05)
            victim = _busiest(ports)
            processes[victim].send_signal(
                signal.SIGKILL
            )  # a crash, mid-load, of a replica carrying requests
            results = [f.result() for f in futures]
        lost = [
            index
            for index, (completed, started) in enumerate(results)
            if not completed and not started
        ]
        cut = [
            index for index, (completed, started) in enumerate(results) if not completed and started
        ]
        assert lost == []  # whatever had not started streaming moved to another replica
        assert sum(completed for completed, _ in results) == 96 - len(cut)
        moved = gateway.log_tail_full().count("trying another")
        assert len(cut) + moved >= 1  # the killed replica was carrying requests when it died
        health = httpx.get(f"{gateway.url}/health").json()
        assert (
            health["status"] == "ok" and str(ports[victim]) in health["detail"]
        )  # named as unavailable
    finally:
        gateway.stop()
