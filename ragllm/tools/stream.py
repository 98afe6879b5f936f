"""An engine's stream with tool calls read out of its text (engines that return raw text)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from ragllm.generation import Delta, DeltaStream, FinishReason, Usage
from ragllm.tools.parsing import ToolCallParser


class ToolCallStream(DeltaStream):
    """Each delta's text split into content and completed calls, one parser a choice; a choice that
    made calls and stopped by itself finishes with ``tool_calls``."""

    def __init__(self, inner: DeltaStream, new_parser: Callable[[], ToolCallParser]) -> None:
        self.request_id = inner.request_id
        self._inner = inner
        self._new_parser = new_parser
        self._parsers: dict[int, ToolCallParser] = {}

    async def __aiter__(self) -> AsyncIterator[Delta]:
        async for delta in self._inner:
            parser = self._parsers.get(delta.index)
            if parser is None:
                parser = self._parsers[delta.index] = self._new_parser()
            text, calls = parser.feed(delta.text)
            finish = delta.finish_reason
            if finish is not None:
                rest, more = parser.finish()
                text, calls = text + rest, calls + more
                if parser.calls and finish is FinishReason.STOP:
                    finish = FinishReason.TOOL_CALLS
            yield replace(delta, text=text, tool_calls=calls or None, finish_reason=finish)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def produced(self) -> Usage | None:
        return self._inner.produced()

    async def settled(self) -> None:
        await self._inner.settled()

    async def scrape_metrics(self) -> list[tuple[str, str]]:
        return await self._inner.scrape_metrics()
