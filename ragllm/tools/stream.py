"""An engine's stream with tool calls read out of its text (engines that return raw text)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from ragllm.engines.base import Delta, DeltaStream, FinishReason
from ragllm.tools.parsing import ToolCallParser


class ToolCallStream(DeltaStream):
    """Each delta's text split into content and completed calls; an answer that made calls and
    stopped by itself finishes with ``tool_calls``."""

    def __init__(self, inner: DeltaStream, parser: ToolCallParser) -> None:
        self.request_id = inner.request_id
        self._inner = inner
        self._parser = parser

    async def __aiter__(self) -> AsyncIterator[Delta]:
        async for delta in self._inner:
            text, calls = self._parser.feed(delta.text)
            finish = delta.finish_reason
            if finish is not None:
                rest, more = self._parser.finish()
                text, calls = text + rest, calls + more
                if self._parser.calls and finish is FinishReason.STOP:
                    finish = FinishReason.TOOL_CALLS
            yield replace(delta, text=text, tool_calls=calls or None, finish_reason=finish)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def scrape_metrics(self) -> list[tuple[str, str]]:
        return await self._inner.scrape_metrics()
