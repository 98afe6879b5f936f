"""A typed client for RAG orchestrators, on top of the official ``openai`` SDK.

from ragllm.client import RagClient, Document

client = RagClient("http://localhost:8081/v1", model="HuggingFaceTB/SmolLM2-135M-Instruct")
answer = client.answer("When was the bridge built?", [Document(id="d1", text="It opened in 1987.")])
print(answer.text, [c.id for c in answer.citations])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ragllm.rag.contract import Citation, RagOptions, RagReport
from ragllm.rag.contract import RagDocument as Document

__all__ = ["Answer", "AsyncRagClient", "Citation", "Document", "RagClient"]


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

    async def close(self) -> None:
        await self._client.close()
