"""The settings tree: defaults < profile file < environment < CLI flags."""

from __future__ import annotations

import os
import re
from unittest import mock

import hypothesis
import pytest
from hypothesis import strategies as st
from pydantic import ValidationError

from ragllm.cli import build_parser, main
from ragllm.cli.serve import settings_from_args
from ragllm.config import DEFAULT_MODEL, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (
        "LLM_MODEL_ID",
        "MODEL_CACHE_DIR",
        "VLLM_MAX_NUM_SEQS",
        "VLLM_MAX_BATCH_SIZE",
        "RAGLLM_PROFILE",
        "RAGLLM_ENGINE__MAX_WAITING",
        "HUGGING_FACE_HUB_TOKEN",
        "REDIS_URL",
        "RAGLLM_SERVER__STREAM_BUFFER_BYTES",
        "RAGLLM_SERVER__STREAM_BUFFER_TOTAL_BYTES",
        "RAGLLM_RAG__ORDER",
    ):
        monkeypatch.delenv(name, raising=False)


def test_local_profile_is_the_default():
    settings = load_settings()
    assert settings.profile == "local"
    assert (settings.engine.max_num_seqs, settings.engine.max_batch_size) == (6, 4)
    assert settings.engine.max_num_batched_tokens == 1024
    assert settings.engine.chunked_prefill is False
    assert settings.engine.model == DEFAULT_MODEL
    assert settings.server.port == 8081


def test_cloud_profile_file_overrides_defaults():
    settings = load_settings(profile="cloud")
    assert (settings.engine.max_num_seqs, settings.engine.max_batch_size) == (32, 32)
    assert settings.engine.chunked_prefill is True
    assert settings.server.host == "0.0.0.0"
    assert str(settings.engine.model_cache_dir) == "/var/lib/llm-cache"


def test_environment_overrides_profile(monkeypatch):
    monkeypatch.setenv("RAGLLM_PROFILE", "cloud")
    monkeypatch.setenv("VLLM_MAX_NUM_SEQS", "12")
    monkeypatch.setenv("VLLM_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("LLM_MODEL_ID", "Qwen/Qwen2.5-1.5B-Instruct-AWQ")
    monkeypatch.setenv("MODEL_CACHE_DIR", "/tmp/models")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret")
    monkeypatch.setenv("RAGLLM_ENGINE__MAX_WAITING", "3")
    settings = load_settings()
    assert settings.profile == "cloud"
    assert (settings.engine.max_num_seqs, settings.engine.max_batch_size) == (12, 8)
    assert settings.engine.model == "Qwen/Qwen2.5-1.5B-Instruct-AWQ"
    assert str(settings.engine.model_cache_dir) == "/tmp/models"
    assert settings.engine.hf_token.get_secret_value() == "hf_secret"
    assert "hf_secret" not in repr(settings)
    assert settings.engine.max_waiting == 3
    assert settings.engine.chunked_prefill is True  # untouched profile values survive


def test_cli_flags_override_environment(monkeypatch):
    monkeypatch.setenv("LLM_MODEL_ID", "from-env")
    monkeypatch.setenv("RAGLLM_PROFILE", "cloud")
    args = build_parser().parse_args(
        ["serve", "--profile", "local", "--model", "from-cli", "--port", "9000"]
    )
    settings = settings_from_args(args)
    assert settings.profile == "local"
    assert settings.engine.model == "from-cli"
    assert settings.server.port == 9000
    assert settings.engine.max_num_seqs == 6


def test_batch_size_never_exceeds_running_sequences(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_NUM_SEQS", "2")
    assert load_settings(profile="cloud").engine.max_batch_size == 2


def test_the_rag_order_default_is_per_profile_and_overridable(monkeypatch):
    assert load_settings().rag.order == "relevance"
    assert load_settings(profile="cloud").rag.order == "stable"
    monkeypatch.setenv("RAGLLM_RAG__ORDER", "stable")
    assert load_settings().rag.order == "stable"
    monkeypatch.setenv("RAGLLM_RAG__ORDER", "by-id")
    with pytest.raises(ValidationError):
        load_settings()


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="unknown profile"):
        load_settings(profile="staging")


def test_slow_reader_and_metrics_cache_settings_come_from_the_environment_and_are_bounded(
    monkeypatch,
):
    assert (load_settings().server.write_timeout_s, load_settings().server.stream_buffer_bytes) == (
        30.0,
        4 * 1024 * 1024,
    )
    assert load_settings().upstream.metrics_cache_s == 5.0
    monkeypatch.setenv("RAGLLM_SERVER__WRITE_TIMEOUT_S", "2.5")
    monkeypatch.setenv("RAGLLM_SERVER__STREAM_BUFFER_BYTES", "65536")
    monkeypatch.setenv("RAGLLM_UPSTREAM__METRICS_CACHE_S", "0")
    settings = load_settings()
    assert (settings.server.write_timeout_s, settings.server.stream_buffer_bytes) == (2.5, 65536)
    assert settings.upstream.metrics_cache_s == 0
    for name, value in [
        ("RAGLLM_SERVER__WRITE_TIMEOUT_S", "0"),
        ("RAGLLM_SERVER__STREAM_BUFFER_BYTES", "100"),
        ("RAGLLM_UPSTREAM__METRICS_CACHE_S", "-1"),
    ]:
        with monkeypatch.context() as patched:
            patched.setenv(name, value)
            with pytest.raises(ValidationError):
                load_settings()


_BUFFER_TOTAL = "RAGLLM_SERVER__STREAM_BUFFER_TOTAL_BYTES"
_BUFFER_ONE = "RAGLLM_SERVER__STREAM_BUFFER_BYTES"


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    total=st.one_of(
        st.integers(-(2**40), 2**40).map(str), st.text("0123456789+-._ ex", max_size=12)
    ),
    one=st.sampled_from([None, "4096", "65536", "4194304", "67108864", "134217728"]),
)
def test_the_total_stream_buffer_is_an_integer_no_smaller_than_one_streams_bound_or_refused(
    total, one
):
    environment = {_BUFFER_TOTAL: total, **({_BUFFER_ONE: one} if one else {})}
    with mock.patch.dict(os.environ, environment):
        try:
            value = load_settings().server.stream_buffer_total_bytes
        except ValidationError:
            value = None
    floor = max(4096, int(one or 4 * 1024 * 1024))
    try:
        number = float(total.replace("_", ""))
    except ValueError:
        number = None
    if value is not None:  # accepted: the number written, and room for one stream's whole buffer
        assert number is not None and value == number and value >= floor
    elif re.fullmatch(r"-?\d+", total):  # a plain integer is refused only below the floor
        assert int(total) < floor


def test_the_total_stream_buffer_defaults_to_16_streams_and_a_bad_value_stops_serve_at_start(
    monkeypatch, capsys
):
    assert (
        load_settings().server.stream_buffer_total_bytes
        == 16 * load_settings().server.stream_buffer_bytes
    )
    monkeypatch.setenv(_BUFFER_ONE, str(8 * 1024 * 1024))
    monkeypatch.setenv(_BUFFER_TOTAL, str(4 * 1024 * 1024))
    assert (
        main(["serve", "--port", "1"]) == 2
    )  # refused before anything starts (port 1 is never bound)
    error = capsys.readouterr().err
    assert "invalid settings" in error and "stream_buffer_total_bytes" in error
    assert "Traceback" not in error


def test_the_in_process_kv_cache_dtype_is_the_engines_own_setting(monkeypatch):
    """engine.kv_cache_dtype: auto in the local profile, unset in the cloud one, set from the
    environment apart from the supervised vLLM's flag."""
    assert load_settings().engine.kv_cache_dtype == "auto"
    assert load_settings(profile="cloud").engine.kv_cache_dtype is None
    monkeypatch.setenv("RAGLLM_ENGINE__KV_CACHE_DTYPE", "fp8")
    settings = load_settings()
    assert (settings.engine.kv_cache_dtype, settings.vllm.kv_cache_dtype) == ("fp8", "auto")
