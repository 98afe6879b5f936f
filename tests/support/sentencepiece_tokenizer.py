"""A small SentencePiece-style tokenizer built on the spot, standing in for Llama 2's (no download)."""

from __future__ import annotations


def sentencepiece_style_tokenizer():
    """A Metaspace tokenizer that marks the first word of the text, as Llama 2's does: a piece after a
    special token tokenizes differently alone than inside the text."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = ["<unk>", "▁", *string.printable]
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(characters)}, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    return fast
