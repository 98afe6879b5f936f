"""Citations: ``[id]`` markers (several ids may share brackets: ``[a, b]``), read out of answers
(``parse_citations``) and, for ``citations: "constrained"``, guaranteed by the engine.

Guaranteed with a regular expression over natural text in which every sentence
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

import re
from collections.abc import Sequence

from ragllm.rag.contract import Citation, RagDocument

# A sentence: anything but brackets, up to its closing punctuation; after a citation, the next one
# starts as sentences and list items do (a model that may write on in lower case after "[id]"
# turns the citation into a word: "[ferry] is a ferry crossing."). A citation: [id] or [id, id, ...].
_WORDS = (
    r"(?:[^\[\].!?]|\.[0-9])"  # a "." before a digit is part of the sentence, a full stop ends it
)
_FIRST_SENTENCE = rf"{_WORDS}+[.!?]"
_NEXT_SENTENCE = rf"\s+[A-Z0-9\"'(*\-]{_WORDS}*[.!?]"
_META = set("\\.+*?()|[]{}^$#&-~")


def citation_pattern(document_ids: Sequence[str], decline: str) -> str:
    """Sentences each followed by a citation of ``document_ids``, or exactly ``decline``."""
    if not document_ids:
        return _escape(decline)
    one = (
        "(?:" + "|".join(_escape(i) for i in sorted(document_ids, key=lambda i: (-len(i), i))) + ")"
    )
    cite = rf"\[{one}(?:, ?{one})*\]"
    return rf"{_FIRST_SENTENCE} ?{cite}(?:{_NEXT_SENTENCE} ?{cite})*|{_escape(decline)}"


def declines(answer: str, decline: str) -> bool:
    """The answer is the template's decline sentence, as the citation pattern's other branch allows it:
    exactly that sentence, nothing else (blanks around it aside, which an unconstrained model may add)."""
    return answer.strip() == decline


def _escape(text: str) -> str:
    return "".join(f"\\{char}" if char in _META else char for char in text)


_CITATION = re.compile(r"\[([^\[\]\n]{1,300})\]")


def parse_citations(
    text: str, documents: dict[str, RagDocument]
) -> tuple[list[Citation], list[str]]:
    """Cited documents in order of first citation, and cited ids that were never supplied."""
    cited: dict[str, Citation] = {}
    unknown: list[str] = []
    for match in _CITATION.finditer(text):
        for part in match.group(1).split(","):
            cited_id = part.strip()
            if not cited_id or " " in cited_id:
                continue  # bracketed prose, not an id
            document = documents.get(cited_id)
            if document is not None:
                cited.setdefault(
                    cited_id, Citation(id=cited_id, title=document.title, source=document.source)
                )
            elif cited_id not in unknown:
                unknown.append(cited_id)
    return list(cited.values()), unknown
