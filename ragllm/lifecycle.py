"""When the process should stop serving: a drain on SIGTERM, or an exit after an engine failure.

The HTTP layer reads it (``/health`` turns 503 and new requests are refused while draining) and
counts the requests in flight; the server loop asks ``should_exit`` on every tick.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

EXIT_ENGINE_FAILED = 70  # EX_SOFTWARE: the orchestrator restarts the process


class Lifecycle:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.in_flight = 0  # generation requests being answered
        self.exit_code = 0
        self.reason = ""
        self._drain_started: float | None = None
        self._exit_now = False

    @property
    def draining(self) -> bool:
        return self._drain_started is not None

    def begin_drain(self, reason: str) -> None:
        """Stop taking work; exit once what is in flight has finished or the grace period is over."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()
            self.reason = reason
            logger.info("%s: draining %d requests in flight (grace %.0f s)", reason, self.in_flight, self.grace_s)

    def request_exit(self, code: int, reason: str) -> None:
        """Exit at the next tick, with ``code``."""
        if not self._exit_now:
            logger.critical("exiting with status %d: %s", code, reason)
            self.exit_code, self.reason, self._exit_now = code, reason, True

    def should_exit(self) -> bool:
        if self._exit_now:
            return True
        if self._drain_started is None:
            return False
        return self.in_flight == 0 or time.monotonic() - self._drain_started >= self.grace_s
