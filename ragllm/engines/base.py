"""The engine seam: one generate call, ``health()`` and ``aclose()``.

Everything that produces tokens (the in-process engine, an upstream pool, a supervised vLLM)
implements ``Engine``; compositions such as a router implement it too. The data they exchange with
the service is ``ragllm.generation``'s, the stream ``generate`` returns included.
"""

from __future__ import annotations

import abc
import asyncio

from ragllm.errors import NotSupportedByEngine
from ragllm.generation import (
    DeltaStream,
    EngineHealth,
    EngineStats,
    GenerationRequest,
    ModelCard,
    SamplingParams,
    TokenizedPrompt,
)

# Texts counted at once by the default ``count_text_tokens`` (each may be a request to an upstream).
COUNT_CONCURRENCY = 8


class Engine(abc.ABC):
    """The seam. ``generate`` validates and admits (raising ``ragllm.errors`` types); the stream it
    returns yields deltas until one carries a ``finish_reason``."""

    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Load whatever the engine needs; called once, in the background, by the app's lifespan."""

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> DeltaStream: ...

    @abc.abstractmethod
    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens the request's prompt takes (template applied), for context budgeting."""

    async def count_text_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text takes tokenized alone, as a prompt; engines that can count many texts in
        one pass do better than this one request per text."""
        limit = asyncio.Semaphore(COUNT_CONCURRENCY)

        async def count(text: str) -> int:
            async with limit:
                probe = GenerationRequest("count", SamplingParams(), prompt=text)
                return await self.count_prompt_tokens(probe)

        return list(await asyncio.gather(*(count(text) for text in texts)))

    async def tokenize(self, request: GenerationRequest, strings: bool = False) -> TokenizedPrompt:
        """The request's prompt ids (template applied), with each id's token string if ``strings``."""
        raise NotSupportedByEngine(
            f"the {self.name} engine cannot return a prompt's token ids", param="return_token_ids"
        )

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens written out; ids outside the vocabulary are a 400."""
        raise NotSupportedByEngine(f"the {self.name} engine cannot detokenize", param="tokens")

    @abc.abstractmethod
    def models(self) -> list[ModelCard]: ...

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def scrape_metrics(self) -> list[tuple[str, str]]:
        """(source, Prometheus text) of engines that export their own metrics (a vLLM upstream)."""
        return []
