"""uvicorn's server, taught to drain: SIGTERM starts a drain instead of closing the listener at once.

While draining, the listener stays open so ``/health`` can answer 503 and new requests get a clear
503 (a load balancer moves them elsewhere) while running answers finish. uvicorn's own shutdown
follows once nothing is in flight or the grace period is over. A drained exit is a clean exit: the
signal is not raised again afterwards, so the status is 0 (or the lifecycle's, after an engine failure).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from ragllm.lifecycle import Lifecycle

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._on_signal) for sig in DRAIN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.lifecycle.begin_drain(f"received {signal.Signals(sig).name}")

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.lifecycle.should_exit()
