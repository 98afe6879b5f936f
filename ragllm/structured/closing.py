"""Closing a structured answer before its token budget runs out, so that it still parses.

An answer held to a grammar that reaches ``max_tokens`` (or the context's end) mid-string is as
useless to a JSON parser as free text: every pipeline downstream throws. Near the end of its budget a
row is therefore steered onto a short way out that its own grammar accepts: close the string, the
array, the object, the call, filling required properties with the least they allow.

The way out is found by the grammar's matcher itself, on a copy of the row's position, never by a
JSON fixer: each step takes the tokens the grammar forces, else the first of a small ranked set of
structural tokens the matcher accepts (quotes, brackets, separators, minimal literals such as
``""``, ``0``, ``false``, ``null``), else the allowed token with the fewest bytes. The search stops
at an accepting position or gives up after ``MAX_CLOSING_TOKENS``: a grammar with no short way out
(a pattern that needs many more characters) keeps running to its budget as before. The ranking
reads where a JSON string is open from the bytes written, only to order the candidates; every token
of the path is one the matcher accepted.

A look stops after ``LOOK_BUDGET_S`` of CPU time, and a row whose look found no way out stops
looking: a grammar that is slow to walk costs its batch one bounded look, once.

The path is greedy: short, not always the shortest. It is recomputed each step while the row's
remaining budget is within ``window`` tokens, and forced once the budget left equals its length plus
``margin``. Meanwhile each token the model chooses in the window is vetted: one that would leave no
way out within the budget (``, {"`` opening an object of required properties a few tokens before the
end) is replaced by the way out's next token. Vetting reads the chosen token on the host, so rows in
their window are sampled there rather than on the device.

Runaway repetition inside a string ("architecture-architecture-...") ends the string early: when the
last tokens of an open string repeat one unit of at most ``MAX_REPEAT_UNIT`` tokens at least
``MIN_REPEATS`` times over at least ``repeat_tokens`` tokens, the tokens that close the string are
forced and the model goes on from there. Ordinary prose does not repeat a token sequence back to
back that many times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_CLOSING_TOKENS = 64  # the longest way out searched for; past it the grammar keeps today's end
MAX_REPEAT_UNIT = 8  # tokens in the longest unit a runaway string is found repeating
MIN_REPEATS = 3  # a unit repeated fewer times back to back is not a runaway
# CPU time one look may take: past it the row has no way out worth its step (a grammar whose masks
# grow slow, say) and stops looking, so a look never stalls the batch it runs in.
LOOK_BUDGET_S = 0.005

# Ranked structural candidates: closing a string, closing brackets, separators, minimal values.
_QUOTE_CLOSERS = b'"}]'
_CLOSERS = b"}]"
_SEPARATORS = (b", ", b",")
_LITERALS = (b'""', b"0", b"false", b"null", b"[]", b"{}", b'"', b"[", b"{", b" ")
_CONTENT = (b"a", b"x", b"0", b"1")  # one character, where a string must be longer first


@dataclass(frozen=True, slots=True)
class ClosingSettings:
    """``window``: the budget left (tokens) below which a row looks for its way out; ``margin``:
    tokens kept spare when forcing it; ``repeat_tokens``: the span of repetition inside a string
    that ends it (0: never)."""

    window: int = 48
    margin: int = 2
    repeat_tokens: int = 16


class StringState:
    """Whether a JSON string is open after the bytes fed so far (and a backslash pending in it)."""

    __slots__ = ("escaped", "open")

    def __init__(self, open: bool = False, escaped: bool = False) -> None:
        self.open = open
        self.escaped = escaped

    def copy(self) -> StringState:
        return StringState(self.open, self.escaped)

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.escaped:
                self.escaped = False
            elif self.open and byte == 0x5C:  # backslash
                self.escaped = True
            elif byte == 0x22:  # double quote
                self.open = not self.open


class ClosingSearch:
    """The ranked candidates of one tokenizer, found once by reading its vocabulary (``index`` is
    llguidance's tokenizer, ``vocab_size`` the ids it may choose). Thread-safe once built."""

    def __init__(self, index: Any, vocab_size: int) -> None:
        self._index = index
        self.vocab_size = vocab_size
        self.token_bytes: list[bytes] = [index.decode_bytes([i]) for i in range(vocab_size)]
        lengths = np.array([len(b) or 1 << 20 for b in self.token_bytes], dtype=np.int64)
        self._by_length = np.argsort(lengths, kind="stable")  # fewest bytes first, then lowest id
        self._in_string = self._ranked(
            lambda b: b[:1] == b'"' and all(c in _QUOTE_CLOSERS for c in b)
        ) + self._exact(_CONTENT)
        closers = self._ranked(lambda b: bool(b) and all(c in _CLOSERS for c in b))
        self._outside = closers + self._exact(_SEPARATORS) + self._exact(_LITERALS)

    def _ranked(self, keep: Any) -> list[int]:
        """Ids whose bytes ``keep`` accepts, the longest first (closing more in one token)."""
        found = [i for i, data in enumerate(self.token_bytes) if keep(data)]
        return sorted(found, key=lambda i: (-len(self.token_bytes[i]), i))

    def _exact(self, spellings: tuple[bytes, ...]) -> list[int]:
        where = {data: i for i, data in reversed(list(enumerate(self.token_bytes)))}
        return [where[s] for s in spellings if s in where]

    def path(
        self,
        matcher: Any,
        strings: StringState,
        limit: int = MAX_CLOSING_TOKENS,
        budget_s: float = LOOK_BUDGET_S,
    ) -> list[int]:
        """The tokens that take ``matcher``'s position (a copy; the row's is left alone) to one
        where its grammar is complete, at most ``limit`` of them; empty if it is complete already.
        Raises ``NoWayOut`` where none was found within the limit or ``budget_s`` of CPU time."""
        deadline = time.thread_time() + budget_s
        probe = matcher.deep_copy()
        strings = strings.copy()
        path: list[int] = []
        while not (probe.is_accepting() or probe.is_stopped()):
            if probe.is_error() or len(path) >= limit or time.thread_time() > deadline:
                raise NoWayOut(len(path))
            forced = probe.compute_ff_tokens()[: limit - len(path)]
            taken = probe.try_consume_tokens(forced) if forced else 0
            chosen = forced[:taken] if taken else [self._step(probe, strings)]
            for token in chosen:
                strings.feed(self.token_bytes[token])
            path += chosen
        return path

    def _step(self, probe: Any, strings: StringState) -> int:
        """The first ranked candidate ``probe`` accepts (consumed), else its allowed token with the
        fewest bytes."""
        for token in self._in_string if strings.open else self._outside:
            if probe.try_consume_tokens([token]) == 1:
                return token
        mask = np.frombuffer(probe.compute_bitmask(), dtype=np.uint32)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: self.vocab_size]
        for token in self._by_length[bits[self._by_length] == 1][:8]:
            if len(self.token_bytes[token]) and probe.try_consume_tokens([int(token)]) == 1:
                return int(token)
        raise NoWayOut(0)


class NoWayOut(Exception):
    """No accepting position was reached within the search's limit."""


class Closer:
    """One row's way out of its grammar (``matcher``), before its budget ends or out of a runaway
    string: ``forced(remaining)`` before each step says which token the row must take (None: the
    model chooses), ``accepted(token)`` after it keeps count."""

    def __init__(
        self,
        matcher: Any,
        search: ClosingSearch,
        settings: ClosingSettings,
        thinking_end: int | None = None,
    ) -> None:
        self.matcher = matcher
        # An answer that opens with thinking: its free text is no JSON, so strings are read (and
        # runaways looked for) only once this marker has been taken.
        self.thinking_end = thinking_end
        self.search = search
        self.settings = settings
        self.strings = StringState()
        self.pending: list[int] = []
        self.closing = False  # the budget's end is being closed: the answer ends with the path
        self.hopeless = False  # no short way out exists from here on: nothing is forced
        self._string_tokens: list[int] = []  # the tokens of the string open now
        self._way_out: list[int] | None = None  # this step's, while the model chooses
        self._repeating = False

    def forced(self, remaining: int) -> int | None:
        """The token this row must take when ``remaining`` tokens of budget are left, this one
        included; None where the model chooses."""
        if self.pending:
            return self.pending[0]
        if self.hopeless:
            return None
        if self._repeating:
            self._repeating = False
            return self._close_string()
        if remaining > self.settings.window:
            return None
        try:
            path = self.search.path(self.matcher, self.strings, min(remaining, MAX_CLOSING_TOKENS))
        except NoWayOut:
            # Within the window a path longer than the budget left only grows: stop looking.
            self.hopeless = True
            return None
        self._way_out = path
        if path and remaining <= len(path) + self.settings.margin:
            self.pending = path
            self.closing = True
            return path[0]
        return None

    def vetting(self, remaining: int) -> bool:
        """Whether the token chosen with ``remaining`` tokens left must pass ``vetted`` before use."""
        return not self.hopeless and remaining <= self.settings.window

    def vetted(self, token: int, remaining: int) -> int:
        """``token``, chosen freely with ``remaining`` tokens left, or the way out's next token where
        ``token`` would leave no way out within the budget: one token outside a string (``, {"``)
        can lengthen the way out by a whole object of required properties."""
        way_out, self._way_out = self._way_out, None
        if self.pending or not way_out or not self.vetting(remaining):
            return token
        probe = self.matcher.deep_copy()
        if probe.try_consume_tokens([token]) != 1:
            return token  # the grammar refuses it and says so when the row takes it
        strings = self.strings.copy()
        strings.feed(self.search.token_bytes[token])
        try:
            self.search.path(probe, strings, min(remaining - 1, MAX_CLOSING_TOKENS))
        except NoWayOut:
            return way_out[0]
        return token

    def _close_string(self) -> int | None:
        """The tokens that leave the open string, forced; the model goes on after them."""
        try:
            path = self.search.path(self.matcher, self.strings)
        except NoWayOut:
            return None
        strings = self.strings.copy()
        for count, token in enumerate(path, 1):
            strings.feed(self.search.token_bytes[token])
            if not strings.open:
                self.pending = path[:count]
                return path[0]
        return None

    def accepted(self, token: int) -> None:
        """The row took ``token`` (its grammar already moved on)."""
        if self.pending:
            self.pending = self.pending[1:] if self.pending[0] == token else []
        if self.thinking_end is not None:
            if token == self.thinking_end:
                self.thinking_end = None
                self.strings = StringState()
            return
        was_open = self.strings.open
        self.strings.feed(self.search.token_bytes[token])
        if not (was_open and self.strings.open):
            self._string_tokens = []
            return
        self._string_tokens.append(token)
        limit = self.settings.repeat_tokens
        # ``repeats`` reads only the tail: a long string keeps no more of itself than that, so the
        # per-token work and the row's memory stay bounded however long the string runs.
        kept = max(limit, MAX_REPEAT_UNIT * MIN_REPEATS) + MAX_REPEAT_UNIT
        if len(self._string_tokens) > 2 * kept:
            del self._string_tokens[:-kept]
        if limit and not self.pending and repeats(self._string_tokens, limit):
            self._repeating = True
            self._string_tokens = []

    @property
    def closed(self) -> bool:
        """The budget's way out has been taken to its end: the answer is complete under its grammar."""
        return self.closing and not self.pending and self.matcher.is_accepting()


def repeats(tokens: list[int], span: int) -> bool:
    """Whether ``tokens`` end with one unit of at most ``MAX_REPEAT_UNIT`` tokens repeated back to
    back at least ``MIN_REPEATS`` times, over at least ``span`` tokens."""
    for unit in range(1, MAX_REPEAT_UNIT + 1):
        if len(tokens) <= unit or tokens[-1] != tokens[-1 - unit]:
            continue  # what nearly every token of a string settles, without building a tail
        length = max(span, unit * MIN_REPEATS)
        length -= length % unit  # whole units
        if length < span:
            length += unit
        if length > len(tokens):
            continue
        tail = tokens[-length:]
        if all(tail[i] == tail[i % unit] for i in range(unit, length)):
            return True
    return False
