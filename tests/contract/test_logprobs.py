"""logprobs and top_logprobs through the official SDK, against transformers' own log_softmax over
the packaged model (float32, CPU), for chat and text completions, streaming and not."""

from __future__ import annotations

import math

import openai
import pytest
import torch

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    """The packaged model as transformers loads it, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    engine = load_settings().engine
    path = resolve_model(engine.model, engine.model_cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _greedy_logprobs(
    reference, prompt_ids: list[int], steps: int
) -> list[tuple[int, torch.Tensor]]:
    """(chosen id, log_softmax over the vocabulary) at each greedy step, teacher-forced."""
    model, _ = reference
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(steps):
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            chosen = int(logprobs.argmax())
            out.append((chosen, logprobs))
            ids.append(chosen)
    return out


def _chat_prompt_ids(reference) -> list[int]:
    _, tokenizer = reference
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def _check(entries, expected, tokenizer, top: int) -> None:
    assert len(entries) == len(expected)
    for entry, (chosen, logprobs) in zip(entries, expected):
        assert entry.token == tokenizer.decode([chosen])
        assert math.isclose(entry.logprob, float(logprobs[chosen]), abs_tol=TOLERANCE)
        assert entry.bytes == list(entry.token.encode())
        best = torch.topk(logprobs, top)
        assert [t.token for t in entry.top_logprobs] == [
            tokenizer.decode([int(i)]) for i in best.indices
        ]
        for alternative, value in zip(entry.top_logprobs, best.values):
            assert math.isclose(alternative.logprob, float(value), abs_tol=TOLERANCE)


def test_chat_logprobs_match_transformers(client, model, reference):
    completion = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        extra_headers=NO_CACHE,
    )
    choice = completion.choices[0]
    assert choice.message.refusal is None and choice.logprobs.refusal is None
    expected = _greedy_logprobs(
        reference, _chat_prompt_ids(reference), completion.usage.completion_tokens
    )
    _check(choice.logprobs.content, expected, reference[1], top=3)


def test_streamed_logprobs_equal_the_whole_answers(client, model):
    whole = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        extra_headers=NO_CACHE,
    )
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_headers=NO_CACHE,
    )
    entries = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in entries] == [
        (e.token, e.logprob) for e in whole.choices[0].logprobs.content
    ]


def test_completion_logprobs_in_the_legacy_format(client, model, reference):
    _, tokenizer = reference
    prompt_ids = tokenizer("The capital of France is").input_ids
    completion = client.completions.create(
        model=model,
        prompt=prompt_ids,
        temperature=0,
        max_tokens=4,
        logprobs=2,
        extra_headers=NO_CACHE,
    )
    logprobs = completion.choices[0].logprobs
    expected = _greedy_logprobs(reference, prompt_ids, len(logprobs.tokens))
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    for value, alternatives, (chosen, reference_logprobs) in zip(
        logprobs.token_logprobs, logprobs.top_logprobs, expected
    ):
        assert math.isclose(value, float(reference_logprobs[chosen]), abs_tol=TOLERANCE)
        assert len(alternatives) == 2


def test_answers_without_logprobs_say_null(client, model):
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=2, extra_headers=NO_CACHE
    )
    assert completion.choices[0].logprobs is None and completion.choices[0].message.refusal is None
    assert "refusal" in completion.choices[0].message.model_dump(exclude_unset=True)


def test_top_logprobs_without_logprobs_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, top_logprobs=2)
    assert error.value.body["param"] == "top_logprobs"
