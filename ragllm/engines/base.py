"""The engine seam: one generate call, ``health()`` and ``aclose()``.

Everything that produces tokens (the in-process engine, an upstream pool, a supervised vLLM)
implements ``Engine``; compositions such as a router implement it too. The data they exchange with
the service is ``ragllm.generation``'s, the stream ``generate`` returns included.
"""

from __future__ import annotations

import abc

from ragllm.generation import DeltaStream, EngineHealth, EngineStats, GenerationRequest, ModelCard


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
