"""Readiness as work done: while the engine is idle, a one-token generation no client sees proves
every ``interval_s`` that the model still answers. A thread that is alive but stuck in a step (a hung
kernel, a lost device) passes every liveness check; it fails this one."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from ragllm.engines.inprocess.sequence_builder import SequenceBuilder
from ragllm.generation import GenerationRequest, SamplingParams


class Canary:
    def __init__(
        self,
        worker: Any,
        sequences: SequenceBuilder,
        token_id: int,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self.worker = worker
        self.sequences = sequences
        self.token_id = token_id  # any valid id serves as the prompt
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def run_while(
        self, ready: Callable[[], bool], idle: Callable[[], bool], on_failure: Callable[[str], None]
    ) -> None:
        """Check whenever the engine is ``idle`` and has made no progress for ``interval_s``, for as long
        as it is ``ready``; a failed check is reported to ``on_failure`` (and ends the watch)."""
        while ready():
            await asyncio.sleep(self.interval_s / 2)
            quiet_for = time.monotonic() - self.worker.last_progress
            if idle() and quiet_for >= self.interval_s:
                failure = await self.check()
                if failure is not None and ready():
                    on_failure(f"the canary generation failed: {failure}")
                    return

    async def check(self) -> BaseException | None:
        """One canary generation; the error it ended with, or None if a token came in time."""
        request = GenerationRequest(
            "canary-" + os.urandom(6).hex(),
            SamplingParams(max_tokens=1, temperature=0.0),
            prompt_token_ids=[self.token_id],
        )
        sequence = self.sequences.new_sequence(request, [self.token_id])
        sequence.for_client = False
        self.worker.submit(sequence)
        try:
            answer = await asyncio.wait_for(sequence.sink.get(), self.timeout_s)
        except TimeoutError:
            self.worker.abort(request.request_id)
            return TimeoutError(f"no token within {self.timeout_s:g} s")
        return answer if isinstance(answer, BaseException) else None
