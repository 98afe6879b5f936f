"""Citations the engine guarantees: a regular expression over natural text in which every sentence
is followed by a well-formed citation of the packed documents' ids ("... in 1987. [bridge]"), unless
the answer declines with the template's own sentence.

The citation follows the sentence's closing ".", "!" or "?" because that is where a model puts its
full stop of its own accord: held there, even a small model cites (it picks the id it finds most
likely among the allowed ones). Allowed to cite anywhere but not to stop before citing, small models
write on past the answer instead. A "." inside a sentence is allowed only before a digit (3.5, a
version 2.1.4), so a number never ends a sentence early; "e.g." still does.

A regular expression, not a grammar, because every engine behind us understands one the same way:
the in-process engine, and vLLM's ``structured_outputs.regex`` with either of its grammar backends.
"""

from __future__ import annotations

from collections.abc import Sequence

# A sentence: anything but brackets, up to its closing punctuation; after a citation, the next one
# starts as sentences and list items do (a model that may write on in lower case after "[id]"
# turns the citation into a word: "[ferry] is a ferry crossing."). A citation: [id] or [id, id, ...].
_WORDS = r"(?:[^\[\].!?]|\.[0-9])"  # a "." before a digit is part of the sentence, a full stop ends it
_FIRST_SENTENCE = rf"{_WORDS}+[.!?]"
_NEXT_SENTENCE = rf"\s+[A-Z0-9\"'(*\-]{_WORDS}*[.!?]"
_META = set("\\.+*?()|[]{}^$#&-~")


def citation_pattern(document_ids: Sequence[str], decline: str) -> str:
    """Sentences each followed by a citation of ``document_ids``, or exactly ``decline``."""
    if not document_ids:
        return _escape(decline)
    one = "(?:" + "|".join(_escape(i) for i in sorted(document_ids, key=lambda i: (-len(i), i))) + ")"
    cite = rf"\[{one}(?:, ?{one})*\]"
    return rf"{_FIRST_SENTENCE} ?{cite}(?:{_NEXT_SENTENCE} ?{cite})*|{_escape(decline)}"


def _escape(text: str) -> str:
    return "".join(f"\\{char}" if char in _META else char for char in text)
