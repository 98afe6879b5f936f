"""The random checkpoints' tokenizer (ragllm/testing/random_checkpoints.py) loads as written whatever
the model type, one token a word: GPU benchmarks and tests size their prompts with it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ragllm.testing.random_checkpoints import word, write_tokenizer


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_each_word_is_one_token_and_every_id_decodes(tmp_path, model_type):
    write_tokenizer(tmp_path, 5000)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": model_type, "vocab_size": 5000})
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 5000
    words = [word(n) for n in range(1000, 1096)]
    ids = tokenizer(" " + " ".join(words), add_special_tokens=False).input_ids
    assert len(ids) == 96 and tokenizer.decode(ids) == " " + " ".join(words)
    chat = tokenizer(
        "<|im_start|>user\n" + " ".join(words) + "<|im_end|>", add_special_tokens=False
    ).input_ids
    assert chat[0] == 1 and chat[-1] == 2 and 96 < len(chat) < 110
    assert all(tokenizer.decode([i]) for i in range(3, 5000))  # any sampled id is some text
