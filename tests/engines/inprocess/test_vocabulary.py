"""The vocabulary read both ways for /tokenize and /detokenize, with the packaged model's tokenizer."""

from __future__ import annotations

import pytest

from ragllm.engines.inprocess.vocabulary import Vocabulary
from ragllm.errors import InvalidRequest

TEXT = "<|im_start|>user\nWhen was the Verdant Bridge completed?<|im_end|>\n"


@pytest.fixture(scope="module")
def vocabulary(tokenizer) -> Vocabulary:
    return Vocabulary(tokenizer)


def test_ids_decode_back_to_their_text_special_tokens_written_out(vocabulary, tokenizer):
    ids = tokenizer(TEXT).input_ids
    assert vocabulary.decode(ids) == TEXT
    strings = vocabulary.strings(ids)
    assert strings[0] == "<|im_start|>" and len(strings) == len(ids)
    assert tokenizer.convert_tokens_to_string(strings) == TEXT


def test_every_id_of_the_vocabulary_decodes_and_none_past_it(vocabulary, tokenizer):
    last = vocabulary.size - 1
    assert last == max(tokenizer.get_vocab().values())
    assert isinstance(vocabulary.decode([0, last]), str)
    for token_ids, position in (([vocabulary.size], 0), ([5, -1], 1), ([1, 2, 2**31], 2)):
        with pytest.raises(InvalidRequest) as refused:
            vocabulary.decode(token_ids)
        assert refused.value.param == "tokens"
        assert f"tokens[{position}]" in refused.value.message


def test_texts_are_counted_alone_in_one_pass(vocabulary, tokenizer):
    texts = ["[bridge]\nThe Verdant Bridge was completed in 1987.", "", "ferry " * 50]
    counts = vocabulary.count(texts)
    assert counts[1] == 0 and counts[0] > 5 and counts[2] >= 50
    assert counts[0] == len(tokenizer.encode(texts[0], add_special_tokens=False))
    assert vocabulary.count([]) == []
