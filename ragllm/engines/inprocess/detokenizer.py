"""Token ids → text, one token at a time, without splitting characters or leaking stop strings."""

from __future__ import annotations

from typing import Any

from ragllm.held_text import partial_suffix_length

# Prompt tokens kept as decoding context, so a first word keeps its leading space
# (SentencePiece-style tokenizers drop it when a token is decoded alone).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas.

    Text is only released once it no longer ends in U+FFFD, i.e. once every multi-byte character
    started by the tokens so far is complete. Each push decodes a short window, not the whole text.
    With a fast (Rust) tokenizer the window is decoded by its own ``DecodeStream``, the same method
    in one call instead of two Python ``decode`` calls: 0.7 µs a token against 5.7 µs, measured on
    the packaged tokenizer, host time taken from every other request served by the engine thread.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._backend, self._stream = _decode_stream(tokenizer, self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            text = self._stream.step(self._backend, token_id)
            if not text:
                return ""
        else:
            prefix_text = self._decode(self._prefix_offset, self._read_offset)
            full_text = self._decode(self._prefix_offset, len(self._ids))
            if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
                return ""
            text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)


def _decode_stream(tokenizer: Any, context_ids: list[int]) -> tuple[Any, Any]:
    """The tokenizer's Rust backend and a stream decoder primed with ``context_ids``, or (None, None)
    where there is none (a Python tokenizer, or a tokenizers release without ``DecodeStream``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    try:
        from tokenizers.decoders import DecodeStream

        return backend, DecodeStream(ids=context_ids, skip_special_tokens=True)
    except (ImportError, TypeError):
        return None, None


class StopMatcher:
    """Finds stop strings across delta boundaries; the stop string itself is never released.

    Text that could be the beginning of a stop string is held back until it is ruled out.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buffer = self._pending + text
        hit = self._earliest_stop(buffer)
        if hit is not None:
            self._pending = ""
            return buffer[:hit], True
        held = partial_suffix_length(buffer, self._stops)
        self._pending = buffer[len(buffer) - held :]
        return buffer[: len(buffer) - held], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending

    def _earliest_stop(self, buffer: str) -> int | None:
        """Where the answer ends: at the stop string that completes first (as generation would have
        stopped there, however the text was split into tokens); of several completing at once, the
        longest. A stop's first occurrence is also where it first completes."""
        ends = [
            (index + len(stop), -len(stop), index)
            for stop in self._stops
            if (index := buffer.find(stop)) >= 0
        ]
        return min(ends)[2] if ends else None
