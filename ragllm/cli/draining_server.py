"""uvicorn's server, taught to drain: SIGTERM starts a drain instead of closing the listener at once.

While draining, the listener stays open so ``/health`` can answer 503 and new requests get a clear
503 (a load balancer moves them elsewhere) while running answers finish. uvicorn's own shutdown
follows once nothing is in flight or the grace period is over. A drained exit is a clean exit: the
signal is not raised again afterwards, so the status is 0 (or the lifecycle's, after an engine failure).

A request stops being in flight when its last bytes are handed to the connection, not when the client
has them: a client that reads slowly may still have tens of kilobytes to read from the connection's
write buffer. uvicorn waits a fixed ``timeout_graceful_shutdown`` for such connections to close (they
close once flushed) and then exits, cutting them; here they get what is left of the grace period.
"""

from __future__ import annotations

import contextlib
import signal
import socket
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
        self._close_wait_s = config.timeout_graceful_shutdown or 0

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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, its wait for connections still flushing an answer stretched to the rest
        of the grace period (idle connections are closed at once; the wait ends when the last one goes)."""
        self.config.timeout_graceful_shutdown = max(
            self._close_wait_s, self.lifecycle.grace_left_s()
        )
        await super().shutdown(sockets)
