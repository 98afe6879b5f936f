"""The loaded tokenizer's vocabulary, read both ways for clients: token ids written out as text (and
each id's token string), and many texts counted in one pass. Called off the event loop."""

from __future__ import annotations

from typing import Any

from ragllm.errors import InvalidRequest


class Vocabulary:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # Added tokens may sit past len(tokenizer) in some vocabularies: the highest id bounds it.
        self.size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens written out (so a prompt's ids give its text back)."""
        self.check(token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def strings(self, token_ids: list[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (byte-level pieces such as ``Ġthe``)."""
        return [str(token) for token in self.tokenizer.convert_ids_to_tokens(token_ids)]

    def count(self, texts: list[str]) -> list[int]:
        """Tokens of each text alone, without the special tokens a prompt would begin with."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]

    def check(self, token_ids: list[int]) -> None:
        for index, token_id in enumerate(token_ids):
            if not 0 <= token_id < self.size:
                raise InvalidRequest(
                    f"tokens[{index}] is {token_id}, outside this model's vocabulary "
                    f"(ids 0 to {self.size - 1})",
                    param="tokens",
                    code="invalid_value",
                )
