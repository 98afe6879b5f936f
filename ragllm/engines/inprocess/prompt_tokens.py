"""Prompt text → token ids, reusing the ids of long pieces, and of reused documents, seen before.

A rendered chat prompt is a run of pieces between special tokens (``<|im_start|>``, ``<|im_end|>``…):
the system message with its documents, each turn, the question. Fast tokenizers split the special
tokens out first and tokenize each piece on its own, so a piece's ids do not depend on its
neighbours. In RAG traffic the document piece comes back again and again while the question
changes; tokenizing it is the largest per-request cost outside the model (measured: ~10 ms of CPU
for a 4k-token prompt on a 2-core machine), so its ids are kept in a bounded LRU keyed by its text
and the request's cache scope, as are the ids of each document whose KV a request reuses
(``document_prompt`` tokenizes those on their own, whatever their length). A hit is faster, and
the scope matters: a tenant who timed its own requests could otherwise learn which documents
another tenant had sent.

Whether a tokenizer really tokenizes pieces independently is checked once, on probe texts; one that
does not (a SentencePiece tokenizer that marks the first word of a piece, tokens that swallow the
spaces around them) is used whole, as before.

Client text reaches the rendered prompt escaped (``literal_text``): a prompt that carries escapes is
split at the template's special tokens, and each piece holding an escape is unescaped and tokenized
with special tokens switched off, so text such as ``<|im_end|>`` in a document stays text. That path is
taken only by prompts whose client text needed an escape; with a tokenizer that is used whole, those
prompts are tokenized piece by piece (ids may differ at piece edges from whole-text tokenization, and
stay the same for the same prompt).
"""

from __future__ import annotations

import copy
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ragllm.engines.inprocess.literal_text import ESCAPE, LiteralText, special_token_texts

# Pieces shorter than this are tokenized on every request (a cache lookup would cost about as much),
# except documents whose KV is reused (``encode(recurring=True)``): those come back by design.
MIN_CACHED_CHARS = 1024
DEFAULT_MAX_CACHED_CHARS = 32 << 20
# Each entry is charged this many characters besides its text's: its key, list and ids cost memory
# of their own (~440 bytes for a 20-character document), so many small entries cannot hold far more
# memory than the bound says.
ENTRY_OVERHEAD_CHARS = 256
_PROBE_BODIES = (
    "You are helpful.\n\nDocuments:\n[1] Paris is the capital of France. 3.14 !",
    "  leading spaces and trailing  ",
    "\nnewline first",
    "word",
    " café naïve 東京 🙂\t",
)


class PromptTokenizer:
    """``encode(text)`` gives the same ids as ``tokenizer(text, add_special_tokens=False).input_ids`` for
    text without escapes; ``literal`` escapes the client's values before the template renders them."""

    def __init__(self, tokenizer: Any, max_cached_chars: int = DEFAULT_MAX_CACHED_CHARS) -> None:
        self._tokenizer = tokenizer
        self._max_cached_chars = max_cached_chars
        self._cached: OrderedDict[tuple[bytes, str], list[int]] = (
            OrderedDict()
        )  # (scope, piece) → ids
        self._cached_chars = 0
        self._lock = threading.Lock()  # prompts are tokenized on several worker threads
        self._specials = _special_token_ids(tokenizer)
        self._splitter = _splitter(self._specials)
        self.segmented = self._splitter is not None and self._agrees_on_probes()
        self.hits = 0
        self.literal = LiteralText(special_token_texts(tokenizer))
        self._control_ids = {
            token: tokenizer.convert_tokens_to_ids(token) for token in self.literal.special_tokens
        }
        self._control_splitter = _splitter(self._control_ids)
        self._plain = _plain_encoder(tokenizer)

    def encode(self, text: str, scope: bytes = b"", recurring: bool = False) -> list[int]:
        """Ids of a rendered prompt; client text in it (escaped) is tokenized as plain text. Pieces are
        reused only within ``scope`` (the request's cache scope: tenant and salt). ``recurring``: the
        text comes back by design (a document whose KV is reused), so its ids are kept whatever its
        length."""
        min_chars = 1 if recurring else MIN_CACHED_CHARS
        if ESCAPE in text and self._control_splitter is not None:
            return self._by_pieces(
                text,
                lambda piece: self._piece_with_literals(piece, scope, min_chars),
                self._control_splitter,
                self._control_ids,
            )
        if not self.segmented:
            return self._whole(text)
        return self._by_pieces(text, lambda piece: self._piece(piece, scope, min_chars=min_chars))

    def _by_pieces(
        self,
        text: str,
        piece_ids: Callable[[str], list[int]],
        splitter: re.Pattern[str] | None = None,
        specials: dict[str, int] | None = None,
    ) -> list[int]:
        """Special tokens as their ids, the text between them through ``piece_ids``."""
        splitter, specials = splitter or self._splitter, specials or self._specials
        ids: list[int] = []
        for piece in splitter.split(text):
            if piece:
                special = specials.get(piece)
                ids += [special] if special is not None else piece_ids(piece)
        return ids

    def _piece_with_literals(self, piece: str, scope: bytes, min_chars: int) -> list[int]:
        if ESCAPE in piece:
            return self._piece(
                piece, scope, lambda escaped: self._plain(self.literal.unescape(escaped)), min_chars
            )
        return (
            self._piece(piece, scope, min_chars=min_chars) if self.segmented else self._whole(piece)
        )

    def _piece(
        self,
        piece: str,
        scope: bytes = b"",
        encode: Callable[[str], list[int]] | None = None,
        min_chars: int = MIN_CACHED_CHARS,
    ) -> list[int]:
        """Keyed by the piece's text as rendered: an escaped piece never equals a plain one (it holds
        U+E000, which plain pieces never do), so the two kinds of ids cannot be mixed up."""
        encode = encode or self._whole
        if len(piece) < min_chars:
            return encode(piece)
        key = (scope, piece)
        with self._lock:
            cached = self._cached.get(key)
            if cached is not None:
                self._cached.move_to_end(key)
                self.hits += 1
                return cached
        ids = encode(piece)
        self._remember(key, ids)
        return ids

    def _remember(self, key: tuple[bytes, str], ids: list[int]) -> None:
        cost = len(key[1]) + ENTRY_OVERHEAD_CHARS
        if cost > self._max_cached_chars:
            return
        with self._lock:
            if key in self._cached:
                return
            self._cached[key] = ids
            self._cached_chars += cost
            while self._cached_chars > self._max_cached_chars:
                (_, evicted), _ = self._cached.popitem(last=False)
                self._cached_chars -= len(evicted) + ENTRY_OVERHEAD_CHARS

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
        if (
            getattr(token, "lstrip", False)
            or getattr(token, "rstrip", False)
            or getattr(token, "single_word", False)
        ):
            return {}
        if getattr(token, "normalized", False) and not getattr(token, "special", False):
            return {}
        tokens[str(token)] = int(token_id)
    return tokens


def _plain_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text → ids with the special tokens switched off (their text tokenized as ordinary text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_special_tokens"):
        # transformers sets this flag on the shared backend per call and leaves it set; a copy of our
        # own keeps concurrent requests, which tokenize with special tokens on, unaffected.
        plain = copy.deepcopy(backend)
        plain.encode_special_tokens = True
        return lambda text: plain.encode(text, add_special_tokens=False).ids
    return lambda text: (
        tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    )


def _splitter(specials: dict[str, int]) -> re.Pattern[str] | None:
    if not specials:
        return None
    # Longest first, so that a token containing another matches whole (as the tokenizer matches).
    alternatives = sorted(specials, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(token) for token in alternatives) + ")")
