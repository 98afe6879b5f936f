"""The official OpenAI SDK against a real server with the packaged model: chat completions."""

from __future__ import annotations

import pytest

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
NO_CACHE = {"Cache-Control": "no-cache, no-store"}  # compare fresh generations, not cache replays
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def test_chat_answers_the_capital_of_france(client, model):
    completion = client.chat.completions.create(
        model=model, messages=CAPITAL, temperature=0, max_tokens=30
    )
    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == model
    assert completion.system_fingerprint.startswith("fp_")
    assert completion.created > 1_700_000_000


def test_usage_counts_prompt_and_completion_tokens(client, model):
    completion = client.chat.completions.create(
        model=model, messages=CAPITAL, temperature=0, max_tokens=30
    )
    usage = completion.usage
    # The ChatML prompt of this one question is 37 tokens with the model's default system message.
    assert usage.prompt_tokens == 37
    assert 1 <= usage.completion_tokens <= 30
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_chat_arrives_in_chunks_with_usage_last(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=STORY,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=NO_CACHE,
    )
    chunks = list(raw.parse())
    # The headers leave with the first token, so they carry its timings.
    assert 0 <= float(raw.headers["x-ragllm-queue-ms"]) <= float(raw.headers["x-ragllm-ttft-ms"])
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 5
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    whole = client.chat.completions.create(
        model=model, messages=STORY, temperature=0, max_tokens=24, extra_headers=NO_CACHE
    )
    assert "".join(texts) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert int(raw.headers["x-ragllm-prompt-tokens"]) == whole.usage.prompt_tokens


@pytest.mark.parametrize("n", [1, 2])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client, model, n):
    """vLLM's extension, which a gateway in front of us asks for: a client that leaves early still
    knows what the answer cost. Without include_usage it does nothing, as in vLLM."""
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=STORY,
            temperature=0.7,
            seed=3,
            max_tokens=12,
            n=n,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_headers=NO_CACHE,
        )
    )
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and final.completion_tokens == 12 * n
    carrying = [
        c
        for c in chunks
        if c.choices and (c.choices[0].delta.content or c.choices[0].finish_reason)
    ]
    assert len(carrying) >= 12 * n - 2 and all(c.usage is not None for c in carrying)
    assert {c.usage.prompt_tokens for c in carrying} == {final.prompt_tokens}
    so_far = [c.usage.completion_tokens for c in carrying]
    assert so_far == sorted(so_far) and so_far[-1] == final.completion_tokens and so_far[0] <= 2
    assert all(
        c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in carrying
    )
    alone = list(
        client.chat.completions.create(
            model=model,
            messages=CAPITAL,
            max_tokens=4,
            stream=True,
            stream_options={"continuous_usage_stats": True},
        )
    )
    assert all(c.usage is None for c in alone)


def test_stream_without_include_usage_has_no_usage(client, model):
    chunks = list(
        client.chat.completions.create(model=model, messages=CAPITAL, max_tokens=4, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_tokens_ends_with_length(client, model):
    completion = client.chat.completions.create(model=model, messages=STORY, max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3


def test_max_completion_tokens_is_honoured(client, model):
    completion = client.chat.completions.create(
        model=model, messages=STORY, max_completion_tokens=5
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def _reference(client, model, max_tokens=40):
    return (
        client.chat.completions.create(
            model=model, messages=STORY, temperature=0, max_tokens=max_tokens
        )
        .choices[0]
        .message.content
    )


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_string_spanning_tokens_is_never_emitted(client, model, as_list):
    reference = _reference(client, model)
    # A stop string that starts inside one token and ends inside a later one.
    start = len(reference) // 2
    stop = reference[start : start + 7]
    assert len(stop.strip()) >= 3, reference
    expected = reference[: reference.index(stop)]
    stop_arg = [stop, "never-appears-zzz"] if as_list else stop
    completion = client.chat.completions.create(
        model=model, messages=STORY, temperature=0, max_tokens=40, stop=stop_arg
    )
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(
        model=model,
        messages=STORY,
        temperature=0,
        max_tokens=40,
        stop=stop_arg,
        stream=True,
        extra_headers=NO_CACHE,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == expected


def test_seeded_sampling_is_reproducible(client, model):
    def sample(seed):
        return (
            client.chat.completions.create(
                model=model,
                messages=STORY,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
                max_tokens=16,
                extra_headers=NO_CACHE,
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_extension_sampling_fields_are_accepted(client, model):
    completion = client.chat.completions.create(
        model=model,
        messages=CAPITAL,
        max_tokens=8,
        user="user-1",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert completion.choices[0].message.content


def test_system_and_developer_messages_and_text_parts(client, model):
    messages = [
        {"role": "developer", "content": "Answer in one word."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital "},
                {"type": "text", "text": "of France?"},
            ],
        },
    ]
    completion = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=10
    )
    assert completion.choices[0].message.content


def test_langchain_chat_openai_works_unchanged(server, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="not-needed",
        model=model,
        temperature=0,
        max_tokens=30,
        max_retries=0,
    )
    assert "Paris" in llm.invoke("What is the capital of France?").content
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert "Paris" in streamed
