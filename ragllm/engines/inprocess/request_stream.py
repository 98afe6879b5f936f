"""A request's stream of deltas from the in-process engine: its choices' sequences put deltas in a
queue on the event loop; the stream reads them until every choice has finished.

Closing it early aborts the request and frees its admission; what the engine produced for it is read
off its sequences (``produced()``) once the engine has confirmed the abort (``settled()``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from ragllm.engines.inprocess.sequence import Sequence
from ragllm.errors import EngineFailure, RagLLMError
from ragllm.generation import Delta, DeltaStream, Usage

logger = logging.getLogger(__name__)
# While a left request's billing waits for the engine to confirm its abort, how often it checks that
# the engine thread is still there to confirm it.
ABORT_POLL_S = 0.5


class EngineHandle(Protocol):
    """What a stream needs of its engine."""

    stall_timeout_s: float

    def abort(self, request_id: str) -> asyncio.Future[None]:
        """Remove the request; the future is done once the engine thread has removed it."""

    def is_running(self) -> bool: ...

    def release_admission(self) -> None: ...


class RequestStream(DeltaStream):
    """The deltas of a request's choices, as its sequences produce them; done when every choice has
    finished. A failure of any choice fails the request (closing it frees the other choices)."""

    def __init__(self, sequences: list[Sequence], engine: EngineHandle) -> None:
        self.request_id = sequences[0].request_id
        self._engine = engine
        # Every choice, kept here: the scheduler empties the leader's followers once they start.
        self._choices = tuple(sequences)
        self._queue: asyncio.Queue = sequences[0].sink
        self._unfinished = len(sequences)
        self._done = False
        self._removed: asyncio.Future[None] | None = (
            None  # the engine's word that the abort is done
        )

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while not self._done:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._finish()
                if self._unfinished > 1:  # the other choices would run on for nobody
                    self._removed = self._engine.abort(self.request_id)
                if isinstance(item, RagLLMError):  # the engine's own verdict on this request
                    raise item
                raise EngineFailure(f"generation failed: {item}") from item
            if item.finish_reason is not None:
                self._unfinished -= 1
                if not self._unfinished:
                    self._finish()
            yield item

    async def aclose(self) -> None:
        if not self._done:
            self._finish()
            self._removed = self._engine.abort(self.request_id)

    async def settled(self) -> None:
        """Once an abort is in, the engine thread may still be running the step it started (a long
        prefill can take many seconds): wait for its word that the request is out, so ``produced()``
        counts that step's tokens too. Bounded by the engine's stall timeout, and over at once if the
        engine thread has stopped."""
        if self._removed is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._engine.stall_timeout_s
        while not self._removed.done() and self._engine.is_running():
            if loop.time() >= deadline:
                logger.warning(
                    "request %s: the engine did not confirm its abort within %g s; billing what "
                    "it had produced by then",
                    self.request_id,
                    self._engine.stall_timeout_s,
                )
                return
            await asyncio.wait({self._removed}, timeout=ABORT_POLL_S)

    def produced(self) -> Usage:
        """Read off the sequences (the engine thread appends to them): the prompt once the leader was
        scheduled, every choice's sampled tokens, queued for the consumer or not."""
        leader = self._choices[0]
        prompt = leader.num_prompt_tokens if leader.queue_time_s is not None else 0
        return Usage(prompt, sum(len(s.output_ids) for s in self._choices))

    def _finish(self) -> None:
        self._done = True
        self._engine.release_admission()
