"""Text held back while it could still become a marker: the end of a streamed buffer that may be
the start of a stop string (the detokenizer) or of a thinking tag (the thinking stripper)."""

from __future__ import annotations


def partial_suffix_length(buffer: str, candidates: tuple[str, ...]) -> int:
    """Length of the longest end of ``buffer`` that could begin one of ``candidates`` (to hold back)."""
    longest = min(len(buffer), max(len(candidate) for candidate in candidates) - 1)
    for length in range(longest, 0, -1):
        suffix = buffer[-length:]
        if any(candidate.startswith(suffix) for candidate in candidates):
            return length
    return 0
