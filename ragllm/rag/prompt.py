"""The RAG prompt, pure: documents and a question in, messages out.

- Templates are data (``ragllm/rag/templates/<name>.toml``), versioned by name (``default@1``).
- Documents are ranked (score, highest first; then id): the ranking decides which documents fit.
  They are then laid out in the request's order: by rank ("relevance") or by id ("stable", so the
  same document set renders the same bytes whatever the question or the scores, and engine prefix
  caches hit across questions).
- Citations are ``[id]`` markers (several ids may share brackets: ``[a, b]``), read back by
  ``citations``; ``<think>...</think>`` is removed from answers by ``ragllm.thinking`` unless
  reasoning was asked for.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from ragllm.errors import InvalidRequest
from ragllm.rag.contract import RagDocument, RagOrder

NO_THINK = "/no_think"


@dataclass(frozen=True)
class RagTemplate:
    name: str
    instruction: str
    documents_header: str
    document: str
    document_separator: str
    # What an answer says when the documents do not hold it (constrained citations allow exactly this).
    decline: str = "The documents do not contain the answer."


@lru_cache(maxsize=32)
def load_template(name: str) -> RagTemplate:
    """A template by name; raises InvalidRequest (400) for one that does not exist."""
    if not re.fullmatch(r"[a-z0-9_-]+@\d+", name):
        raise InvalidRequest(f"unknown RAG template {name!r}", param="rag.template")
    resource = resources.files("ragllm.rag.templates").joinpath(f"{name}.toml")
    if not resource.is_file():
        raise InvalidRequest(f"unknown RAG template {name!r}", param="rag.template")
    return RagTemplate(name=name, **tomllib.loads(resource.read_text()))


def rank(documents: list[RagDocument]) -> list[RagDocument]:
    """Canonical order: higher score first (unscored last), then id; duplicate ids are refused."""
    seen: set[str] = set()
    for document in documents:  # one pass: a request may carry many documents
        if document.id in seen:
            raise InvalidRequest(
                f"document id {document.id!r} appears more than once", param="documents"
            )
        seen.add(document.id)
    return sorted(documents, key=lambda d: (d.score is None, -(d.score or 0.0), d.id))


def arrange(ranked: list[RagDocument], order: RagOrder) -> list[RagDocument]:
    """The packed documents in the order the prompt lays them out. Ids are required and unique
    (``rank`` refuses duplicates), so "stable" is a total order on the set alone."""
    if order == "stable":
        return sorted(ranked, key=lambda d: d.id)
    return ranked


def render_messages(
    template: RagTemplate, documents: list[RagDocument], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One system message (instruction, the caller's system text, the documents), then the
    conversation, whose last user turn is the question."""
    caller_system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    rendered = [render_document(template, d) for d in documents]
    block = template.document_separator.join(rendered) if rendered else "(no documents)"
    system = "\n\n".join(
        [template.instruction, *caller_system, f"{template.documents_header}\n\n{block}"]
    )
    conversation = [m for m in messages if m["role"] != "system"]
    if not conversation or conversation[-1]["role"] != "user":
        raise InvalidRequest("a RAG request ends with the user's question", param="messages")
    return [{"role": "system", "content": system}, *conversation]


def render_document(template: RagTemplate, document: RagDocument) -> str:
    """One document as the template writes it into the system message."""
    return _tidy(
        template.document.format(
            id=document.id,
            title=document.title or "",
            source=document.source or "",
            text=document.text.strip(),
        )
    )


def _tidy(text: str) -> str:
    """No trailing blanks (an untitled document would leave one after its id)."""
    return "\n".join(line.rstrip() for line in text.split("\n"))


def with_no_think(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deployment README's contract for models without a thinking switch in their template."""
    last = messages[-1]
    return [*messages[:-1], {**last, "content": f"{last['content']} {NO_THINK}"}]
