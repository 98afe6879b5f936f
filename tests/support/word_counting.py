"""An engine that counts a prompt's words as its tokens, for tests of packing."""

from __future__ import annotations

from ragllm.engines.base import Engine


class WordCountingEngine(Engine):
    """Test double of an engine for packing: a prompt's tokens are its words (packing is the subject)."""

    name = "words"

    async def start(self) -> None: ...
    async def generate(self, request):
        raise NotImplementedError

    def models(self):
        return []

    def health(self):
        raise NotImplementedError

    def stats(self):
        raise NotImplementedError

    async def aclose(self) -> None: ...

    async def count_prompt_tokens(self, request) -> int:
        return sum(len(str(m["content"]).split()) for m in request.messages)
