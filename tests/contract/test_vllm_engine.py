"""The ``vllm`` engine's child supervision, with a real child: the vLLM stand-in
(``tests/support/vllm_standin.py``), which checks the flags and serves the packaged model as vLLM
would, /health and /metrics included."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.servers import MODEL, ServerProcess, free_port

STANDIN = Path(__file__).resolve().parents[1] / "support" / "vllm_standin.py"


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def _read_pid(path: Path, other_than: int | None = None) -> int | None:
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    return pid if pid != other_than else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def _health(server: ServerProcess) -> httpx.Response | None:
    try:
        return httpx.get(f"{server.url}/health", timeout=2)
    except httpx.TransportError:
        return None


def _ask(server: ServerProcess) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=8,
        temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_headers={"Cache-Control": "no-store"},
    )
    assert reply.model == MODEL
    return reply.choices[0].message.content


def test_child_is_started_awaited_restarted_and_stopped(tmp_path):
    pid_file = tmp_path / "child.pid"
    child_port = free_port()
    server = ServerProcess(
        "--engine",
        "vllm",
        log_dir=tmp_path,
        env={
            "RAGLLM_VLLM__COMMAND": f"{sys.executable} {STANDIN}",
            "RAGLLM_VLLM__PORT": str(child_port),
            "RAGLLM_VLLM__RESTART_BACKOFF_MAX_S": "1",
            "RAGLLM_UPSTREAM__PROBE_INTERVAL_S": "0.3",
            "VLLM_STANDIN_PID_FILE": str(pid_file),
        },
    )
    try:
        # Readiness wait: the service answers at once, 503 "starting" while the child loads its model.
        first = _wait(lambda: _health(server), 60, "the service never answered")
        assert first.status_code == 503, first.text
        assert "vllm is starting" in first.json()["detail"]
        server.wait_ready()
        child = _read_pid(pid_file)
        assert child and _alive(child)
        assert "Paris" in _ask(server)

        # vLLM's own series come through, labelled with the child they came from.
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'upstream="http://127.0.0.1:{child_port}"' in metrics
        assert any(
            line.startswith("vllm:num_requests_running{") and "upstream=" in line
            for line in metrics.splitlines()
        )

        # Restart: a crash of the child is noticed, answered with 503, and repaired.
        os.kill(child, 9)
        down = _wait(
            lambda: (h := _health(server)) is not None and h.status_code == 503 and h,
            30,
            "the service did not notice the child's death",
        )
        assert "vllm" in down.json()["detail"]
        server.wait_ready()
        restarted = _read_pid(pid_file, other_than=child)
        assert restarted and _alive(restarted)
        assert "Paris" in _ask(server)
    finally:
        server.stop()
    # Clean stop: the child goes with the service (stopped by it, not orphaned).
    _wait(lambda: not _alive(restarted), 20, "the child outlived the service")


def test_missing_vllm_is_reported_by_health(tmp_path):
    server = ServerProcess(
        "--engine",
        "vllm",
        log_dir=tmp_path,
        env={
            "RAGLLM_VLLM__COMMAND": str(tmp_path / "no-such-vllm"),
            "RAGLLM_VLLM__PORT": str(free_port()),
        },
    )
    try:
        health = server.wait_until(
            lambda r: r.status_code == 503 and "cannot start" in r.json()["detail"], 30
        )
        assert "is vLLM installed" in health.json()["detail"]
        assert health.json()["status"] != "ok"
    finally:
        server.stop()


@pytest.mark.parametrize("profile", ["local", "cloud"])
def test_standin_parses_the_command_of_both_profiles(profile, monkeypatch):
    """The stand-in knows only vLLM's documented flags; the derived command must parse under it."""
    from ragllm.config import load_settings
    from ragllm.engines.vllm.flags import vllm_serve_args
    from tests.support.vllm_standin import parse

    monkeypatch.setenv("RAGLLM_REDIS__URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    args = vllm_serve_args(load_settings(profile=profile), executable=["vllm"])
    parsed = parse(args[1:])
    assert parsed.model == load_settings(profile=profile).engine.model
    assert parsed.enable_prompt_tokens_details
    assert parsed.enable_chunked_prefill == (profile == "cloud")
