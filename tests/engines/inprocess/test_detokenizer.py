"""Incremental detokenization and stop strings, with the packaged model's real tokenizer."""

from __future__ import annotations

import pytest

from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer, StopMatcher


@pytest.mark.parametrize(
    "text",
    [
        "Plain ASCII words, with punctuation!",
        "Ünïcödé: 東京は日本の首都です 🚀🔥 — done",
        "👩‍👩‍👧 family emoji and ∑∫√ maths",
    ],
)
def test_deltas_never_split_a_character_and_add_up_to_the_text(tokenizer, text):
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens here
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.push(token) for token in ids]
    deltas.append(detokenizer.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


class PythonOnlyTokenizer:
    """The real tokenizer's ``decode`` without its Rust backend, as a Python tokenizer presents itself."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


@pytest.mark.parametrize(
    "text", ["Ünïcödé: 東京は日本の首都です 🚀🔥 — done", "split emoji at the end 🚀"]
)
def test_stream_decoding_gives_the_deltas_of_window_decoding(tokenizer, text):
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids[:-1]  # may end inside a character
    ids[3:3] = [
        len(tokenizer) + 5
    ]  # an id past the vocabulary (logits can be wider) decodes to nothing
    streamed = IncrementalDetokenizer(tokenizer, prompt)
    windowed = IncrementalDetokenizer(PythonOnlyTokenizer(tokenizer), prompt)
    assert streamed._stream is not None and windowed._stream is None
    assert [streamed.push(t) for t in ids] == [windowed.push(t) for t in ids]
    assert streamed.flush() == windowed.flush()


def test_stop_string_split_across_deltas_is_withheld():
    matcher = StopMatcher(("END",))
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D and more") == ("", True)


def test_false_start_of_a_stop_string_is_released():
    matcher = StopMatcher(("END",))
    assert matcher.feed("an E") == ("an ", False)
    assert matcher.feed("xit") == ("Exit", False)
    assert matcher.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(("world", "lo w"))
    assert matcher.feed("hello world") == ("hel", True)


def test_no_stop_strings_passes_text_through():
    matcher = StopMatcher(())
    assert matcher.feed("anything") == ("anything", False)


def test_pending_text_is_flushed_at_the_end():
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("almost ST") == ("almost ", False)
    assert matcher.flush() == "ST"
