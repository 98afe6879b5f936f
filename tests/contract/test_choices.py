"""``n`` choices from one request (Ragas' answer relevancy asks for several): choice i is what a
single request with seed + i gives, the prompt is counted once, and streams carry each choice's index."""

from __future__ import annotations

import httpx
import pytest

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
QUESTION = [{"role": "user", "content": "Name a fruit."}]


def _ask(client, model, **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=1.0,
        max_tokens=12,
        extra_headers=NO_CACHE,
        **kwargs,
    )


def test_choice_i_is_the_single_answer_with_seed_plus_i_and_the_prompt_counts_once(client, model):
    several = _ask(client, model, n=3, seed=40)
    singles = [_ask(client, model, seed=40 + i) for i in range(3)]
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.message.content for c in several.choices] == [
        s.choices[0].message.content for s in singles
    ]
    assert len({c.message.content for c in several.choices}) > 1  # sampled, so they differ
    assert several.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert several.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    again = _ask(client, model, n=3, seed=40)
    assert [c.message.content for c in again.choices] == [
        c.message.content for c in several.choices
    ]


def test_a_stream_carries_each_choices_index_and_finish(client, model):
    whole = _ask(client, model, n=3, seed=7)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            temperature=1.0,
            max_tokens=12,
            n=3,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=NO_CACHE,
        )
    )
    texts, finishes, roles = {}, {}, set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            roles.update([choice.index] if choice.delta.role == "assistant" else [])
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1, 2}
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    # The same counts; the stream, sent second, may find the prompt in the prefix cache.
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_text_completions_take_n_too(client, model):
    answer = client.completions.create(
        model=model,
        prompt="Once upon a time",
        n=2,
        seed=3,
        temperature=1.0,
        max_tokens=8,
        extra_headers=NO_CACHE,
    )
    single = client.completions.create(
        model=model,
        prompt="Once upon a time",
        seed=4,
        temperature=1.0,
        max_tokens=8,
        extra_headers=NO_CACHE,
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[1].text == single.choices[0].text


def test_constrained_choices_each_follow_the_constraint(client, model):
    answer = _ask(
        client, model, n=4, seed=1, extra_body={"guided_choice": ["apple", "pear", "plum"]}
    )
    assert len(answer.choices) == 4
    assert all(
        c.message.content in ("apple", "pear", "plum") and c.finish_reason == "stop"
        for c in answer.choices
    )


# The shared server runs the local profile: 6 engine slots, so 8 choices cannot run at once.
@pytest.mark.parametrize(
    "n, words", [(9, "at most 8"), (0, "greater than or equal to 1"), (8, "max_num_seqs=6")]
)
def test_n_out_of_range_is_a_400(server, model, n, words):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=30,
        headers=NO_CACHE,
        json={"model": model, "messages": QUESTION, "n": n, "max_tokens": 3},
    )
    assert response.status_code == 400 and words in response.text
