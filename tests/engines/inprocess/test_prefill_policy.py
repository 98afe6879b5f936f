"""The prefill policy on plain numbers: what a step prefills beside decoding rows, and alone."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ragllm.config import EngineSettings
from ragllm.engines.inprocess.prefill_policy import MIN_PREFILL_CHUNK, PrefillPolicy

LOCAL = PrefillPolicy(step_tokens=1024, chunked=False)  # the local profile's numbers
CLOUD = PrefillPolicy(step_tokens=2048, chunked=True)


def _steps_to_prefill(policy: PrefillPolicy, prompt_tokens: int, num_decoding: int) -> list[int]:
    """The chunks a lone prompt is prefilled in, step by step, beside ``num_decoding`` rows."""
    chunks, remaining = [], prompt_tokens
    while remaining:
        chunk = policy.chunk(
            remaining, policy.budget(num_decoding), head=True, decoding=num_decoding > 0
        )
        chunks.append(chunk)
        remaining -= chunk
    return chunks


def test_a_long_prompt_beside_three_streams_is_prefilled_in_half_steps():
    assert _steps_to_prefill(LOCAL, 3300, num_decoding=3) == [512] * 6 + [228]
    assert _steps_to_prefill(CLOUD, 6000, num_decoding=3) == [1024] * 5 + [880]


def test_a_prompt_alone_keeps_the_lowest_latency_path():
    # whole-prompt mode: the whole context window in one step; chunked mode: whole steps
    assert _steps_to_prefill(LOCAL, 8192, num_decoding=0) == [8192]
    assert _steps_to_prefill(CLOUD, 5000, num_decoding=0) == [2048, 2048, 904]


def test_a_prompt_within_the_cap_is_prefilled_whole_beside_decodes():
    assert _steps_to_prefill(LOCAL, 500, num_decoding=3) == [500]


def test_whole_prompt_mode_does_not_start_a_second_prompt_it_cannot_finish():
    budget = LOCAL.budget(3) - 400  # a first prompt of 400 took its share
    assert LOCAL.chunk(300, budget, head=False, decoding=True) == 0
    assert LOCAL.chunk(100, budget, head=False, decoding=True) == 100
    assert (
        CLOUD.chunk(300, CLOUD.budget(3) - 900, head=False, decoding=True) == 124
    )  # chunked: what is left


def test_the_cap_is_settable_and_stays_within_a_step():
    assert PrefillPolicy(1024, False, max_while_decoding=256).budget(3) == 256
    assert (
        PrefillPolicy(1024, False, max_while_decoding=4096).budget(3) == 1021
    )  # no more than a step leaves
    assert PrefillPolicy(1024, False, max_while_decoding=4096).budget(0) == 1024


def test_the_head_gets_a_chunk_however_many_rows_decode():
    policy = PrefillPolicy(step_tokens=64, chunked=True)
    assert policy.budget(64) == 0
    assert policy.chunk(1000, policy.budget(64), head=True, decoding=True) == MIN_PREFILL_CHUNK
    assert policy.chunk(1000, policy.budget(64), head=False, decoding=True) == 0


@given(
    step=st.integers(16, 8192),
    chunked=st.booleans(),
    cap=st.none() | st.integers(16, 10_000),
    prompt=st.integers(1, 32_768),
    decoding=st.integers(1, 512),
)
def test_beside_decodes_a_step_prefills_at_most_its_share_and_finishes_in_bounded_steps(
    step, chunked, cap, prompt, decoding
):
    policy = PrefillPolicy(step, chunked, cap)
    share = max(MIN_PREFILL_CHUNK, min(step // 2 if cap is None else cap, step))
    chunks = _steps_to_prefill(policy, prompt, decoding)
    assert sum(chunks) == prompt and all(
        chunk > 0 for chunk in chunks
    )  # never starved, nothing lost
    assert max(chunks) <= share  # what a stream waits for between two tokens
    per_step = max(MIN_PREFILL_CHUNK, min(share, step - decoding))
    assert len(chunks) <= math.ceil(prompt / per_step)  # what the prompt waits for its first token


@given(
    step=st.integers(16, 8192),
    chunked=st.booleans(),
    remaining=st.integers(1, 32_768),
    spent=st.integers(0, 8192),
    head=st.booleans(),
    decoding=st.booleans(),
)
def test_a_chunk_is_never_negative_nor_more_than_is_left(
    step, chunked, remaining, spent, head, decoding
):
    policy = PrefillPolicy(step, chunked)
    chunk = policy.chunk(
        remaining, policy.budget(int(decoding)) - spent, head=head, decoding=decoding
    )
    assert 0 <= chunk <= remaining
    if head:
        assert chunk > 0


def test_the_setting_is_checked():
    assert EngineSettings().max_prefill_tokens_while_decoding is None
    assert (
        EngineSettings(max_prefill_tokens_while_decoding=256).max_prefill_tokens_while_decoding
        == 256
    )
    for wrong in (0, 15, -1, "many", 2.5):
        with pytest.raises(ValueError):
            EngineSettings(max_prefill_tokens_while_decoding=wrong)
