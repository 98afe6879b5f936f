"""Which cached answers used which document: the index an invalidation reads.

Each cached RAG answer is listed under every document packed into its prompt, one index per (cache
group, document id), so evicting a document's answers reads one index, never a scan of the cache.
Three rules keep it exact and bounded, in both backends:

- An index holds at most ``max_answers_per_document`` answers. Past the cap the answers that expire
  first leave it, and leave the cache with it: whatever drops out of an index is evicted, so no
  answer ever outlives the record that would invalidate it.
- An index lives at least as long as its longest-lived answer (its TTL is raised on every store).
- An answer is stored only if none of its documents was invalidated since its request read the
  cache (``Lookup.as_of``): an answer generated from a document while that document was being
  invalidated is dropped, not cached. Invalidations are remembered for ``INVALIDATIONS_KEPT_S``; an
  answer whose request began longer ago than that is not cached at all.
"""

from __future__ import annotations

import hashlib

import orjson

# How long an invalidation is remembered, to refuse answers still being generated from the document
# when it was invalidated; a request that takes longer than this is not cached.
INVALIDATIONS_KEPT_S = 3600
# In-process backend: invalidations remembered at once; past it the oldest is forgotten, and answers
# whose requests began before it are no longer stored (they could not be checked against it).
MAX_INVALIDATIONS_REMEMBERED = 100_000


def document_index(group: str | None, document_id: str) -> str:
    """The name of one document's index within one cache group: a digest of both, JSON-encoded first,
    so no choice of id can spell another group's index."""
    return hashlib.sha256(orjson.dumps([group, document_id])).hexdigest()
