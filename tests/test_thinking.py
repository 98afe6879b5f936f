"""Thinking blocks stripped from answers, streamed or whole."""

from __future__ import annotations

import pytest

from ragllm.thinking import ThinkStripper, strip_thinking


@pytest.mark.parametrize(
    "chunks",
    [
        ["<think>\nLet me think.</think>\n\nThe answer [bridge]."],
        ["<th", "ink>\nLet me", " think.</thi", "nk>", "\n\nThe answer", " [bridge]."],
        ["<think></think>", "The answer [bridge]."],
    ],
)
def test_thinking_is_stripped_across_chunk_boundaries(chunks):
    stripper = ThinkStripper()
    assert "".join(stripper.feed(c) for c in chunks) + stripper.flush() == "The answer [bridge]."


def test_text_that_only_looks_like_a_tag_is_kept():
    assert strip_thinking("a < b and <thin> ice") == "a < b and <thin> ice"
    assert strip_thinking("unfinished <think>thoughts") == "unfinished "
