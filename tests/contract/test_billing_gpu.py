"""Billing on a GPU: 64 streams that leave after their first token are each charged the prompt the
engine prefilled and the tokens it sampled (before this was mended, all 64 were logged with
``prompt_tokens=0, completion_tokens=0``). Random weights of Qwen2.5-1.5B's shape, bf16."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest
import torch

from ragllm.testing.random_checkpoints import build_random_checkpoint, word
from tests.support.servers import ServerProcess, metric_value

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STREAMS = 64


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    model_dir = build_random_checkpoint(
        "qwen2.5-1.5b", tmp_path_factory.mktemp("model") / "qwen2.5-1.5b"
    )
    server = ServerProcess(
        "--model",
        str(model_dir),
        "--device",
        "cuda",
        "--served-model-name",
        "gpu",
        "--max-model-len",
        "2048",
        log_dir=tmp_path_factory.mktemp("gpu-billing"),
        env={
            "RAGLLM_ENGINE__MAX_NUM_SEQS": str(STREAMS),
            "RAGLLM_ENGINE__MAX_BATCH_SIZE": str(STREAMS),
            "RAGLLM_ENGINE__MAX_WAITING": "256",
            "RAGLLM_ENGINE__DTYPE": "bfloat16",
            "RAGLLM_SERVER__LOG_FORMAT": "json",
        },
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _messages(index: int) -> list[dict]:
    return [
        {"role": "user", "content": " ".join(word((index * 131 + i) % 5000) for i in range(96))}
    ]


def _leave_after_first_token(url: str, index: int) -> tuple[str, int]:
    prompt_tokens = httpx.post(
        f"{url}/tokenize", json={"model": "gpu", "messages": _messages(index)}, timeout=60
    ).json()["count"]
    body = {
        "model": "gpu",
        "max_tokens": 256,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "messages": _messages(index),
    }
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"cache-control": "no-store"},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get(
                "content"
            ):
                return response.headers["x-request-id"], prompt_tokens
    raise AssertionError("the stream ended before its first token")


def _engine_counted(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return (
        metric_value(text, "ragllm_engine_prompt_tokens_total"),
        metric_value(text, "ragllm_engine_generation_tokens_total"),
    )


def test_streams_left_after_their_first_token_are_charged_what_the_engine_made(gpu_server):
    engine_before = _engine_counted(gpu_server.url)
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        expected = dict(
            pool.map(lambda index: _leave_after_first_token(gpu_server.url, index), range(STREAMS))
        )
    request_ids = set(expected)
    gpu_server.wait_until(lambda response: response.json()["running"] == 0, timeout_s=60)
    entries = {}
    for line in gpu_server.log_tail_full().splitlines():
        if line.startswith("{") and '"request finished"' in line:
            entry = json.loads(line)
            entries[entry.get("request_id")] = entry
    missing = request_ids - set(entries)
    assert not missing, f"{len(missing)} requests not logged"
    charged = [entries[request_id] for request_id in request_ids]
    print(
        f"\n{STREAMS} streams left after their first token: prompt tokens "
        f"{sorted({int(e['prompt_tokens']) for e in charged})}, completion tokens min "
        f"{min(int(e['completion_tokens']) for e in charged)}, max {max(int(e['completion_tokens']) for e in charged)}"
    )
    for request_id in request_ids:
        entry = entries[request_id]
        assert int(entry["status"]) == 499
        assert (
            int(entry["prompt_tokens"]) == expected[request_id]
        )  # what /tokenize counts: what was prefilled
        assert int(entry["completion_tokens"]) >= 1
        assert (
            int(entry["prompt_tokens"]) > 96
        )  # the 96 words and the template's turns, not lost in tokenizing
    # Exactly what the engine counted, the steps launched ahead before each abort arrived included.
    engine_after = _engine_counted(gpu_server.url)
    assert (engine_after[0] - engine_before[0], engine_after[1] - engine_before[1]) == (
        sum(int(e["prompt_tokens"]) for e in charged),
        sum(int(e["completion_tokens"]) for e in charged),
    )
