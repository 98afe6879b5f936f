"""A document set's identity: the same documents give the same key whatever their order, their
scores or the question asked about them.

An upstream router keeps requests with the same key on the same replica, whose prefix cache then
holds the set's rendered documents; keying on the rendered prompt instead would scatter a set over
replicas whenever a retriever scores it differently for another question.
"""

from __future__ import annotations

import hashlib

import orjson

from ragllm.rag.contract import RagDocument


def document_digest(document: RagDocument) -> bytes:
    """16 bytes naming what a document renders: its id, title, source and text (JSON-encoded, so no
    choice of one field can spell another's)."""
    fields = orjson.dumps([document.id, document.title, document.source, document.text])
    return hashlib.blake2b(fields, digest_size=16).digest()


def document_set_key(template: str, documents: list[RagDocument]) -> str | None:
    """The key of ``documents`` as a set, rendered by ``template`` (another template renders other
    bytes); None for no documents."""
    if not documents:
        return None
    digest = hashlib.blake2b(template.encode() + b"\0", digest_size=16)
    for part in sorted(document_digest(d) for d in documents):
        digest.update(part)
    return digest.hexdigest()
