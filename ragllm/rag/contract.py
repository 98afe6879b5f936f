"""Wire models of the RAG contract: typed documents in, a report of what was used out."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# A document's id: cited as [id] in answers, and what a cache invalidation names.
DocumentId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[^\[\],\s]+$",
        description="Cited as [id]; no spaces, commas or brackets.",
    ),
]
MAX_VERSION_LENGTH = 128

# How packed documents are laid out in the prompt: "relevance" by score, highest first; "stable" by
# id, so the same document set renders the same bytes whatever the question or the scores.
RagOrder = Literal["relevance", "stable"]


class RagDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: DocumentId
    text: str
    title: str | None = None
    source: str | None = Field(
        None, description="Where it came from (URL, path); returned with citations."
    )
    score: float | None = Field(None, description="Retrieval score; higher ranks first.")
    version: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_VERSION_LENGTH,
        description="Extension: the document's revision (an etag, a timestamp, a content hash). Not "
        "shown to the model; an answer cached for one version is never served for another.",
    )


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    template: str = Field("default@1", description="Versioned prompt template.")
    citations: bool | Literal["constrained"] = Field(
        True,
        description='true: parse [id] citations out of the answer; "constrained": also make decoding allow '
        "only well-formed citations of the packed documents, and at least one unless the answer "
        "declines with the template's sentence; false: neither.",
    )
    max_context_tokens: int | None = Field(
        None, ge=1, description="Cap on tokens spent on documents."
    )
    reasoning: bool = Field(
        False, description="Let thinking models think (and keep <think> output)."
    )
    order: RagOrder | None = Field(
        None,
        description='How packed documents are laid out: "relevance" (score, highest first) or '
        '"stable" (by id: the same document set renders the same bytes whatever the question or '
        "the scores, so prefix caches and replica affinity hit). Which documents fit is decided "
        "by score either way. null: the server's default (RAGLLM_RAG__ORDER).",
    )
    kv_reuse: bool | None = Field(
        None,
        description="Reuse each packed document's stored KV at whatever position it lands, "
        "recomputing a share of its tokens to blend it with its neighbours (in-process engine; "
        "docs/rag.md#document-kv-reuse): a much faster first token for documents seen before, an "
        "approximation of a full prefill. null: the server's default (RAGLLM_RAG__KV_REUSE).",
    )


class Citation(BaseModel):
    id: str
    title: str | None = None
    source: str | None = None


class RagReport(BaseModel):
    """The ``rag`` object of a response (in a stream: of its final chunk)."""

    template: str
    used_documents: list[str]
    dropped_documents: list[str]
    context_tokens: int
    citations: list[Citation] = []
    unknown_citations: list[str] = []
    cited: bool = False
    citation_mode: Literal["parsed", "constrained", "off"] = "parsed"


class DocumentTokens(BaseModel):
    id: str
    tokens: int | None = Field(
        description="The document as the template renders it, tokenized alone: its share of "
        "context_tokens, give or take the few tokens where it joins the rest. null for a dropped "
        "document ranked past what any prompt of the model could hold (not counted)."
    )


class RagBudget(BaseModel):
    max_model_len: int = Field(description="The model's context window in tokens.")
    reserved_for_answer: int = Field(
        description="Tokens kept free for the answer: max_tokens, or 512 when unset."
    )
    max_context_tokens: int | None = Field(
        None, description="rag.max_context_tokens, the cap on tokens spent on documents."
    )


class DryRunReport(BaseModel):
    """The ``rag`` object of a /tokenize response: what packing would do, nothing generated."""

    template: str
    used_documents: list[DocumentTokens]
    dropped_documents: list[DocumentTokens]
    context_tokens: int = Field(description="Tokens the packed documents add to the prompt.")
    prompt_tokens: int = Field(description="The whole prompt, as the completion would count it.")
    budget: RagBudget
