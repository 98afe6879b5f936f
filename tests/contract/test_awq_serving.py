"""An AWQ int4 checkpoint served end to end by ``ragllm serve`` on the CPU, through the official SDK.

The checkpoint is the packaged model written in AutoAWQ's published layout (int4 GEMM packing,
groups of 64: its hidden width, 576, is not a multiple of 128). The CPU dequantises it at load, and
the local profile pairs it with an fp8 KV cache, as the deployment README does for vLLM."""

from __future__ import annotations

import math
import shutil

import openai
import pytest
import torch

from ragllm.engines.inprocess.quantized.awq_loader import checkpoint_awq_config, load_awq_model
from ragllm.engines.inprocess.quantized.awq_writer import save_awq_checkpoint
from tests.support.servers import ServerProcess

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
MESSAGES = [{"role": "user", "content": "Name three primary colours."}]
SERVED_NAME = "smollm2-awq"


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    engine = load_settings().engine
    source = resolve_model(engine.model, engine.model_cache_dir)
    target = tmp_path_factory.mktemp("smollm2-awq")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    save_awq_checkpoint(model, target, group_size=64)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def awq_server(awq_checkpoint, tmp_path_factory):
    process = ServerProcess(
        "--model",
        str(awq_checkpoint),
        "--served-model-name",
        SERVED_NAME,
        log_dir=tmp_path_factory.mktemp("awq-server"),
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def awq_client(awq_server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{awq_server.url}/v1", api_key="not-needed", max_retries=0, timeout=120
    )


def test_the_first_tokens_logprobs_are_the_dequantised_models(awq_client, awq_checkpoint):
    """The first token comes from the prompt's prefill alone (no cached keys read back), so it matches
    transformers over the dequantised weights to float32 rounding whatever the cache stores. First in
    the module: no earlier prompt has left blocks in the prefix cache."""
    from transformers import AutoTokenizer

    completion = awq_client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=1,
        logprobs=True,
        top_logprobs=5,
        extra_headers=NO_CACHE,
    )
    tokenizer = AutoTokenizer.from_pretrained(awq_checkpoint)
    reference = load_awq_model(
        awq_checkpoint,
        checkpoint_awq_config(awq_checkpoint),
        torch.float32,
        torch.device("cpu"),
        packed=False,
    )
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert completion.usage.prompt_tokens == len(ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1], dim=-1)
    best = torch.topk(logprobs, 5)
    entry = completion.choices[0].logprobs.content[0]
    assert entry.token == tokenizer.decode([int(best.indices[0])])
    for alternative, value in zip(entry.top_logprobs, best.values):
        assert math.isclose(alternative.logprob, float(value), abs_tol=1e-4)


def test_the_local_profile_pairs_awq_with_an_fp8_kv_cache(awq_server):
    import httpx

    health = httpx.get(f"{awq_server.url}/health").json()
    assert health["status"] == "ok"
    assert health["kv_cache"]["dtype"] == "float8_e4m3fn"
    # One byte per value instead of float32's four: the default 1 GiB budget holds 4x the 23,280 tokens
    # it holds for this model in float32.
    assert health["kv_cache"]["tokens_total"] > 4 * 23_280 * 0.99


def test_chat_answers_stream_and_count_their_tokens(awq_client):
    whole = awq_client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, temperature=0, max_tokens=24, extra_headers=NO_CACHE
    )
    choice = whole.choices[0]
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0
    stream = awq_client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=NO_CACHE,
    )
    chunks = list(stream)
    # (Not compared with the whole answer token for token: the second prompt reads its prefix back from
    # the fp8 cache where the first computed it fresh, which may turn a near-tie.)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0
