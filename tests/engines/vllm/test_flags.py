"""The `vllm serve` command line for both profiles, against vLLM's documented flags."""

from __future__ import annotations

import pytest

from ragllm.config import load_settings
from ragllm.engines.vllm.flags import vllm_serve_args
from tests.support.vllm_standin import flag_values


def _flags(args: list[str]) -> dict[str, str | None]:
    return flag_values(args[3:])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (
        "LLM_MODEL_ID",
        "VLLM_MAX_NUM_SEQS",
        "VLLM_MAX_BATCH_SIZE",
        "TENSOR_PARALLEL_SIZE",
        "MODEL_CACHE_DIR",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "RAGLLM_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)


def test_local_profile_matches_the_deployment_readme(monkeypatch):
    monkeypatch.setenv("LLM_MODEL_ID", "Qwen/Qwen2.5-1.5B-Instruct-AWQ")
    args = vllm_serve_args(load_settings(profile="local"))
    assert args[:3] == ["vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct-AWQ"]
    flags = _flags(args)
    assert flags["--max-num-seqs"] == "6" and flags["--max-num-batched-tokens"] == "1024"
    assert flags["--quantization"] == "awq" and flags["--kv-cache-dtype"] == "fp8"
    assert "--enable-chunked-prefill" not in flags and "--enable-prompt-tokens-details" in flags
    assert flags["--host"] == "127.0.0.1"


def test_cloud_profile_with_the_readme_variables(monkeypatch):
    monkeypatch.setenv("LLM_MODEL_ID", "Qwen/Qwen2.5-7B-Instruct-AWQ")
    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("MODEL_CACHE_DIR", "/var/lib/llm-cache")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318")
    flags = _flags(vllm_serve_args(load_settings(profile="cloud")))
    assert flags["--max-num-seqs"] == "32" and flags["--tensor-parallel-size"] == "2"
    assert "--enable-chunked-prefill" in flags and flags["--quantization"] == "awq"
    assert flags["--download-dir"] == "/var/lib/llm-cache"
    assert flags["--otlp-traces-endpoint"] == "http://otel:4318"
    assert flags["--served-model-name"] == "Qwen/Qwen2.5-7B-Instruct-AWQ"


def test_max_batch_size_has_no_vllm_flag(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_BATCH_SIZE", "3")
    args = vllm_serve_args(load_settings(profile="cloud"))
    assert (
        "3" not in args[3:]
    )  # documented: vLLM decodes all running sequences; --max-num-seqs bounds it


def test_quantization_flags_follow_the_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_MODEL_ID", "HuggingFaceTB/SmolLM2-135M-Instruct")
    flags = _flags(vllm_serve_args(load_settings(profile="local")))
    assert "--quantization" not in flags and "--kv-cache-dtype" not in flags  # a bf16 checkpoint
    local_awq = tmp_path / "my-model"
    local_awq.mkdir()
    (local_awq / "config.json").write_text(
        '{"quantization_config": {"quant_method": "awq", "bits": 4}}'
    )
    monkeypatch.setenv("LLM_MODEL_ID", str(local_awq))
    flags = _flags(vllm_serve_args(load_settings(profile="local")))
    assert flags["--quantization"] == "awq" and flags["--kv-cache-dtype"] == "fp8"
    monkeypatch.setenv("LLM_MODEL_ID", "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setenv("RAGLLM_VLLM__QUANTIZATION", "fp8")  # the operator says so
    assert _flags(vllm_serve_args(load_settings(profile="cloud")))["--quantization"] == "fp8"


def test_kv_cache_settings_reach_vllm_by_its_own_flags(monkeypatch):
    assert _flags(vllm_serve_args(load_settings(profile="local")))["--block-size"] == "16"
    assert "--no-enable-prefix-caching" not in vllm_serve_args(load_settings(profile="local"))
    for name, value in (
        ("BLOCK_SIZE", "32"),
        ("ENABLE_PREFIX_CACHING", "false"),
        ("NUM_KV_BLOCKS", "4096"),
        ("KV_CACHE_MEMORY_BYTES", str(8 << 30)),
    ):
        monkeypatch.setenv(f"RAGLLM_ENGINE__{name}", value)
    flags = _flags(vllm_serve_args(load_settings(profile="cloud")))
    assert flags["--block-size"] == "32" and "--no-enable-prefix-caching" in flags
    assert flags["--num-gpu-blocks-override"] == "4096" and flags["--kv-cache-memory-bytes"] == str(
        8 << 30
    )
