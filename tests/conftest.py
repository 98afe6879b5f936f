from __future__ import annotations

import openai
import pytest

from tests.support.servers import MODEL, ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server with the packaged model, shared by the contract tests."""
    process = ServerProcess(
        env={"RAGLLM_ENGINE__MAX_WAITING": "32"}, log_dir=tmp_path_factory.mktemp("server")
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=300
    )


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged model's own tokenizer (tests that need another define their own)."""
    from transformers import AutoTokenizer

    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    engine = load_settings().engine
    return AutoTokenizer.from_pretrained(resolve_model(engine.model, engine.model_cache_dir))


@pytest.fixture(scope="session")
def model() -> str:
    return MODEL


@pytest.fixture(scope="session")
def shared_redis_url() -> str:
    """The machine's Redis on 127.0.0.1:6379; each test isolates itself with its own key prefix."""
    import redis

    url = "redis://127.0.0.1:6379/0"
    redis.Redis.from_url(url).ping()
    return url
