"""Client text kept literal through the chat template: special-token text in it is never a control token.

A chat template joins its own markers (``<|im_start|>``, ``<|im_end|>``) with text the client sent:
messages, retrieved documents, tool definitions and arguments. Tokenized as one text, the rendered
prompt would read a ``<|im_end|>`` inside a document as the real end of a turn, so content could close
its own turn and forge a system or assistant turn. Matching strings after rendering cannot tell the two
apart; so the client's text is escaped *before* rendering: each special token's text in it becomes a
private-use escape that no template produces and no special token contains. Every special token left in
the rendered prompt is then the template's own; the text between them is unescaped and tokenized with
the tokenizer's special tokens switched off (see ``PromptTokenizer``).

Escapes, all starting with ``ESCAPE`` (U+E000):

- ``ESCAPE ESCAPE``: a literal U+E000 the client sent.
- ``ESCAPE BREAK``: nothing. Put inside a string's head or tail that could be part of a special token,
  so that two client strings a template writes side by side (``"<|im_"`` then ``"end|>"``) cannot
  form one across their boundary.
- ``ESCAPE chr(FIRST_TOKEN + i)``: the text of special token ``i``.

A prompt whose client text holds none of these needs no escape, renders the same bytes as before and
gets the same ids, so the prefix cache and the piece cache see no difference.
"""

from __future__ import annotations

import re
from typing import Any

ESCAPE = "\ue000"
BREAK = "\ue001"
FIRST_TOKEN = 0xE100
MAX_TOKENS = 0xF8FF - FIRST_TOKEN  # the Basic Multilingual Plane's private-use area ends at U+F8FF
_ESCAPE_SEQUENCE = re.compile(ESCAPE + "(.)", re.DOTALL)


def special_token_texts(tokenizer: Any) -> list[str]:
    """The texts of the tokens the tokenizer marks special (those ``split_special_tokens`` turns off):
    control tokens. Added tokens that are not special (Qwen's ``<tool_call>``, ``<think>``) are
    ordinary vocabulary and stay as they are."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {
        str(token) for token in decoder.values() if getattr(token, "special", False) and str(token)
    }
    return sorted(
        texts, key=lambda text: (-len(text), text)
    )  # longest first, as the tokenizer matches


class LiteralText:
    """``escape`` client values before the template renders them; ``unescape`` the rendered text
    between the template's special tokens before tokenizing it as plain text."""

    def __init__(self, special_tokens: list[str]) -> None:
        if len(special_tokens) > MAX_TOKENS or any(_private(token) for token in special_tokens):
            special_tokens = []  # no room for escapes: nothing is escaped (never happens with real vocabularies)
        self.special_tokens = list(special_tokens)
        self._escapes = {
            token: ESCAPE + chr(FIRST_TOKEN + i) for i, token in enumerate(self.special_tokens)
        }
        self._texts = {
            ESCAPE: ESCAPE,
            BREAK: "",
            **{chr(FIRST_TOKEN + i): token for i, token in enumerate(self.special_tokens)},
        }
        self._pattern = (
            re.compile("|".join(re.escape(t) for t in self.special_tokens))
            if special_tokens
            else None
        )
        self._first_chars = frozenset(token[0] for token in self.special_tokens)
        self._heads = frozenset(t[:k] for t in self.special_tokens for k in range(1, len(t)))
        self._tails = frozenset(t[-k:] for t in self.special_tokens for k in range(1, len(t)))
        self._longest = max((len(t) for t in self.special_tokens), default=0)

    def escape(self, value: Any) -> Any:
        """``value`` with every string in it (dictionary keys too, at any depth) escaped."""
        if isinstance(value, str):
            return self.escape_text(value)
        if isinstance(value, dict):
            return {self.escape(key): self.escape(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.escape(item) for item in value)
        return value

    def escape_text(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        if ESCAPE in text:
            text = text.replace(ESCAPE, ESCAPE + ESCAPE)
        if any(
            char in text for char in self._first_chars
        ):  # most text holds no special token's first char
            text = self._pattern.sub(lambda match: self._escapes[match.group()], text)
        return self._broken_edges(text)

    def unescape(self, text: str) -> str:
        if ESCAPE not in text:
            return text
        return _ESCAPE_SEQUENCE.sub(
            lambda match: self._texts.get(match.group(1), match.group()), text
        )

    def _broken_edges(self, text: str) -> str:
        """A break after the first character of every tail that begins a special token, and before the
        last character of every head that ends one."""
        reach = min(self._longest - 1, len(text))
        cuts = {len(text) - k + 1 for k in range(1, reach + 1) if text[-k:] in self._heads}
        cuts |= {k - 1 for k in range(1, reach + 1) if text[:k] in self._tails}
        for cut in sorted(cuts, reverse=True):
            text = text[:cut] + ESCAPE + BREAK + text[cut:]
        return text


def _private(text: str) -> bool:
    return any("\ue000" <= char <= "\uf8ff" for char in text)
