"""The write timeout of a stream: a client whose connection accepts nothing for that long is dropped.

uvicorn's ``send`` waits while the connection's write buffer is full, so a send that stays under way
is a client that stopped reading. Every token of every stream is a send: rather than a timer per
send, one timer per stream looks again when the send under way (or the next one) could first have
run past the timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Message, Send


class WriteWatchdog:
    """Calls ``on_timeout`` once when one ``send`` has been under way for ``timeout_s``."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._write_began: float | None = (
            None  # loop time of the send under way; None between sends
        )
        self._timer = self._loop.call_later(timeout_s, self._check)

    async def send(self, send: Send, message: Message) -> None:
        self._write_began = self._loop.time()
        await send(message)
        self._write_began = None

    def cancel(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        began, now = self._write_began, self._loop.time()
        if began is not None and now - began >= self._timeout_s:
            self._on_timeout()
            return
        self._timer = self._loop.call_at(
            (now if began is None else began) + self._timeout_s, self._check
        )
