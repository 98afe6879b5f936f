"""Wire models of the admin routes (``/admin/...``): operators' calls, not OpenAI's."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragllm.protocol.openai import FAIL_FAST
from ragllm.rag.contract import DocumentId

# Ids one invalidation may name; an ingest pipeline that changed more sends several calls.
MAX_INVALIDATED_DOCUMENTS = 1024


class CacheInvalidation(BaseModel):
    """Evict every cached answer that used any of these documents."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field must not read as "every group"

    document_ids: Annotated[
        list[DocumentId], FAIL_FAST, Field(min_length=1, max_length=MAX_INVALIDATED_DOCUMENTS)
    ] = Field(
        description="Ids of the documents that changed or were deleted, as RAG requests send them."
    )
    cache_group: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Only this cache group's answers (an API key's cache_group, or its id when it names "
        "none); omitted: every cache group, since a document id means a document within one group.",
    )


class CacheInvalidationResult(BaseModel):
    object: Literal["cache.invalidation"] = "cache.invalidation"
    evicted: int = Field(description="Cached answers evicted (those already expired not counted).")
    document_ids: int = Field(description="Distinct document ids invalidated.")
    cache_groups: int = Field(description="Cache groups the invalidation covered.")
