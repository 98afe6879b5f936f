"""A typed client for RAG orchestrators, on top of the official ``openai`` SDK.

from ragllm.client import RagClient, Document

client = RagClient("http://localhost:8081/v1", model="HuggingFaceTB/SmolLM2-135M-Instruct")
answer = client.answer("When was the bridge built?", [Document(id="d1", text="It opened in 1987.")])
print(answer.text, [c.id for c in answer.citations])

plan = client.dry_run("When was the bridge built?", documents, max_tokens=256)  # nothing generated
print([d.id for d in plan.dropped_documents], plan.prompt_tokens, plan.budget)
text = client.detokenize(plan.tokens)  # with return_token_ids=True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ragllm.rag.contract import (
    Citation,
    DocumentTokens,
    DryRunReport,
    RagBudget,
    RagOptions,
    RagReport,
)
from ragllm.rag.contract import RagDocument as Document

__all__ = [
    "Answer",
    "AsyncRagClient",
    "Citation",
    "Document",
    "DocumentTokens",
    "DryRun",
    "RagBudget",
    "RagClient",
]


@dataclass(frozen=True)
class Answer:
    text: str
    citations: list[Citation]
    unknown_citations: list[str]
    used_documents: list[str]
    dropped_documents: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    raw: Any = field(repr=False, default=None)  # the SDK's ChatCompletion

    @property
    def cited(self) -> bool:
        return bool(self.citations)


@dataclass(frozen=True)
class DryRun:
    """What a RAG request would pack, nothing generated (the server's /tokenize with documents)."""

    used_documents: list[DocumentTokens]
    dropped_documents: list[DocumentTokens]
    context_tokens: int
    prompt_tokens: int  # what the completion's usage.prompt_tokens will say
    budget: RagBudget
    tokens: list[int] | None  # the prompt's ids, with return_token_ids=True
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def _server_root(base_url: Any) -> str:
    """The tokenizer routes sit beside /v1, as vLLM's do."""
    return str(base_url).rstrip("/").removesuffix("/v1")


def _dry_run_body(
    model: str,
    question: str,
    documents: list[Document],
    history: list[dict] | None,
    options: RagOptions,
    max_tokens: int | None,
    return_token_ids: bool,
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [*(history or []), {"role": "user", "content": question}],
        "documents": [d.model_dump(exclude_none=True) for d in documents],
        "rag": options.model_dump(exclude_none=True),
        "return_token_ids": return_token_ids,
    }
    return body if max_tokens is None else {**body, "max_tokens": max_tokens}


def _dry_run(answer: dict[str, Any]) -> DryRun:
    report = DryRunReport.model_validate(answer["rag"])
    return DryRun(
        used_documents=report.used_documents,
        dropped_documents=report.dropped_documents,
        context_tokens=report.context_tokens,
        prompt_tokens=report.prompt_tokens,
        budget=report.budget,
        tokens=answer.get("tokens"),
        raw=answer,
    )


def _request(
    model: str,
    question: str,
    documents: list[Document],
    history: list[dict] | None,
    options: RagOptions,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [*(history or []), {"role": "user", "content": question}],
        "extra_body": {
            "documents": [d.model_dump(exclude_none=True) for d in documents],
            "rag": options.model_dump(exclude_none=True),
        },
        **kwargs,
    }


def _answer(completion: Any) -> Answer:
    report = RagReport.model_validate((completion.model_extra or {})["rag"])
    choice = completion.choices[0]
    return Answer(
        text=choice.message.content or "",
        citations=report.citations,
        unknown_citations=report.unknown_citations,
        used_documents=report.used_documents,
        dropped_documents=report.dropped_documents,
        finish_reason=choice.finish_reason,
        prompt_tokens=completion.usage.prompt_tokens,
        completion_tokens=completion.usage.completion_tokens,
        raw=completion,
    )


class RagClient:
    def __init__(
        self, base_url: str, model: str, api_key: str = "unused", **openai_kwargs: Any
    ) -> None:
        from openai import OpenAI

        self.model = model
        self._client = OpenAI(base_url=base_url, api_key=api_key, **openai_kwargs)

    def answer(
        self,
        question: str,
        documents: list[Document],
        *,
        history: list[dict] | None = None,
        options: RagOptions | None = None,
        **kwargs: Any,
    ) -> Answer:
        """Ask ``question`` over ``documents``; ``kwargs`` go to the SDK (max_tokens, temperature, ...)."""
        request = _request(
            self.model, question, documents, history, options or RagOptions(), kwargs
        )
        return _answer(self._client.chat.completions.create(**request))

    def dry_run(
        self,
        question: str,
        documents: list[Document],
        *,
        history: list[dict] | None = None,
        options: RagOptions | None = None,
        max_tokens: int | None = None,
        return_token_ids: bool = False,
    ) -> DryRun:
        """What ``answer`` with the same arguments would pack (documents used and dropped, with their
        tokens; the prompt's tokens; the budget), without generating. ``max_tokens`` is the room the
        answer will be given (512 when unset, as in ``answer``)."""
        body = _dry_run_body(
            self.model,
            question,
            documents,
            history,
            options or RagOptions(),
            max_tokens,
            return_token_ids,
        )
        root = _server_root(self._client.base_url)
        return _dry_run(self._client.post(f"{root}/tokenize", body=body, cast_to=object))

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (special tokens written out), from the server's /detokenize."""
        root = _server_root(self._client.base_url)
        body = {"model": self.model, "tokens": token_ids}
        return self._client.post(f"{root}/detokenize", body=body, cast_to=object)["prompt"]

    def close(self) -> None:
        self._client.close()


class AsyncRagClient:
    def __init__(
        self, base_url: str, model: str, api_key: str = "unused", **openai_kwargs: Any
    ) -> None:
        from openai import AsyncOpenAI

        self.model = model
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key, **openai_kwargs)

    async def answer(
        self,
        question: str,
        documents: list[Document],
        *,
        history: list[dict] | None = None,
        options: RagOptions | None = None,
        **kwargs: Any,
    ) -> Answer:
        request = _request(
            self.model, question, documents, history, options or RagOptions(), kwargs
        )
        return _answer(await self._client.chat.completions.create(**request))

    async def dry_run(
        self,
        question: str,
        documents: list[Document],
        *,
        history: list[dict] | None = None,
        options: RagOptions | None = None,
        max_tokens: int | None = None,
        return_token_ids: bool = False,
    ) -> DryRun:
        """As ``RagClient.dry_run``."""
        body = _dry_run_body(
            self.model,
            question,
            documents,
            history,
            options or RagOptions(),
            max_tokens,
            return_token_ids,
        )
        root = _server_root(self._client.base_url)
        return _dry_run(await self._client.post(f"{root}/tokenize", body=body, cast_to=object))

    async def detokenize(self, token_ids: list[int]) -> str:
        """As ``RagClient.detokenize``."""
        root = _server_root(self._client.base_url)
        body = {"model": self.model, "tokens": token_ids}
        return (await self._client.post(f"{root}/detokenize", body=body, cast_to=object))["prompt"]

    async def close(self) -> None:
        await self._client.close()
