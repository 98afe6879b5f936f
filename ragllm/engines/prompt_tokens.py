"""Prompt text → token ids, reusing the ids of long pieces seen before.

A rendered chat prompt is a run of pieces between special tokens (``<|im_start|>``, ``<|im_end|>``…):
the system message with its documents, each turn, the question. Fast tokenizers split the special
tokens out first and tokenize each piece on its own, so a piece's ids do not depend on its
neighbours. In RAG traffic the document piece comes back again and again while the question
changes; tokenizing it is the largest per-request cost outside the model (measured: ~10 ms of CPU
for a 4k-token prompt on a 2-core machine), so its ids are kept in a bounded LRU keyed by its text.

Whether a tokenizer really tokenizes pieces independently is checked once, on probe texts; one that
does not (a SentencePiece tokenizer that marks the first word of a piece, tokens that swallow the
spaces around them) is used whole, as before.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any, Callable

# Pieces shorter than this are tokenized on every request (a cache lookup would cost about as much).
MIN_CACHED_CHARS = 1024
DEFAULT_MAX_CACHED_CHARS = 32 << 20
_PROBE_BODIES = ("You are helpful.\n\nDocuments:\n[1] Paris is the capital of France. 3.14 !",
                 "  leading spaces and trailing  ", "\nnewline first", "word", " café naïve 東京 🙂\t")


class PromptTokenizer:
    """``encode(text)`` gives the same ids as ``tokenizer(text, add_special_tokens=False).input_ids``."""

    def __init__(self, tokenizer: Any, max_cached_chars: int = DEFAULT_MAX_CACHED_CHARS) -> None:
        self._tokenizer = tokenizer
        self._max_cached_chars = max_cached_chars
        self._cached: OrderedDict[str, list[int]] = OrderedDict()
        self._cached_chars = 0
        self._lock = threading.Lock()  # prompts are tokenized on several worker threads
        self._specials = _special_token_ids(tokenizer)
        self._splitter = _splitter(self._specials)
        self.segmented = self._splitter is not None and self._agrees_on_probes()
        self.hits = 0

    def encode(self, text: str) -> list[int]:
        return self._by_pieces(text, self._piece) if self.segmented else self._whole(text)

    def _by_pieces(self, text: str, piece_ids: Callable[[str], list[int]]) -> list[int]:
        """Special tokens as their ids, the text between them through ``piece_ids``."""
        ids: list[int] = []
        for piece in self._splitter.split(text):
            if piece:
                special = self._specials.get(piece)
                ids += [special] if special is not None else piece_ids(piece)
        return ids

    def _piece(self, piece: str) -> list[int]:
        if len(piece) < MIN_CACHED_CHARS:
            return self._whole(piece)
        with self._lock:
            cached = self._cached.get(piece)
            if cached is not None:
                self._cached.move_to_end(piece)
                self.hits += 1
                return cached
        ids = self._whole(piece)
        self._remember(piece, ids)
        return ids

    def _remember(self, piece: str, ids: list[int]) -> None:
        if len(piece) > self._max_cached_chars:
            return
        with self._lock:
            if piece in self._cached:
                return
            self._cached[piece] = ids
            self._cached_chars += len(piece)
            while self._cached_chars > self._max_cached_chars:
                evicted, _ = self._cached.popitem(last=False)
                self._cached_chars -= len(evicted)

    def _whole(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False).input_ids

    def _agrees_on_probes(self) -> bool:
        specials = list(self._specials)
        for first in specials[:4]:
            for last in specials[-2:]:
                for body in _PROBE_BODIES:
                    text = f"{first}system\n{body}{last}\n{first}user\n{body}{last} {body}"
                    if self._whole(text) != self._by_pieces(text, self._whole):
                        return False
        return True


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Added tokens that match as they are: content → id. Empty when any added token matches after
    normalisation or swallows neighbouring spaces (splitting on the text would then disagree)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens: dict[str, int] = {}
    for token_id, token in decoder.items():
        if getattr(token, "lstrip", False) or getattr(token, "rstrip", False) or getattr(token, "single_word", False):
            return {}
        if getattr(token, "normalized", False) and not getattr(token, "special", False):
            return {}
        tokens[str(token)] = int(token_id)
    return tokens


def _splitter(specials: dict[str, int]) -> re.Pattern[str] | None:
    if not specials:
        return None
    # Longest first, so that a token containing another matches whole (as the tokenizer matches).
    alternatives = sorted(specials, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(token) for token in alternatives) + ")")
