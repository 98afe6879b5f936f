"""When the process should stop serving: a drain on SIGTERM, or an exit after an engine failure.

The HTTP layer reads it (``/health`` turns 503 and new requests are refused while draining) and
counts the requests in flight; the server loop asks ``should_exit`` on every tick.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

EXIT_ENGINE_FAILED = 70  # EX_SOFTWARE: the orchestrator restarts the process
# After an engine failure, /health keeps answering 503 with the reason this long before the exit, so
# probes and operators see why the process is going away.
FAILURE_EXIT_DELAY_S = 1.0


class Lifecycle:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.in_flight = 0  # API requests being answered (generation, tokenize, models)
        self.exit_code = 0
        self.reason = ""
        self._drain_started: float | None = None
        self._exit_at: float | None = None

    def finished_one(self) -> None:
        """A request has been answered and recorded: it no longer holds a drain back."""
        self.in_flight -= 1

    @property
    def draining(self) -> bool:
        return self._drain_started is not None

    def begin_drain(self, reason: str) -> None:
        """Stop taking work; exit once what is in flight has finished or the grace period is over."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()
            self.reason = reason
            logger.info(
                "%s: draining %d requests in flight (grace %.0f s)",
                reason,
                self.in_flight,
                self.grace_s,
            )

    def grace_left_s(self) -> float:
        """What is left of the drain's grace period (0 when not draining or once it is over)."""
        if self._drain_started is None:
            return 0.0
        return max(0.0, self.grace_s - (time.monotonic() - self._drain_started))

    def request_exit(self, code: int, reason: str, after_s: float = FAILURE_EXIT_DELAY_S) -> None:
        """Exit with ``code`` in ``after_s`` seconds."""
        if self._exit_at is None:
            logger.critical("exiting with status %d in %.1f s: %s", code, after_s, reason)
            self.exit_code, self.reason, self._exit_at = code, reason, time.monotonic() + after_s

    def should_exit(self) -> bool:
        if self._exit_at is not None:
            return time.monotonic() >= self._exit_at
        if self._drain_started is None:
            return False
        return self.in_flight == 0 or time.monotonic() - self._drain_started >= self.grace_s
