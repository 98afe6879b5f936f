"""Waiting on work while watching the client: a client that leaves cancels the work, and what the
work made anyway is undone."""

from __future__ import annotations

import asyncio

import pytest

from ragllm.api.sse import until_disconnect
from ragllm.errors import ClientClosedRequest


def _client_that_leaves(after_s: float):
    async def receive() -> dict:
        await asyncio.sleep(after_s)
        return {"type": "http.disconnect"}

    return receive


class Opened:
    """Test double for an engine stream: records whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def test_work_that_finishes_despite_its_cancellation_is_discarded():
    opened = Opened()

    async def open_stream() -> Opened:
        # As Python 3.11's asyncio.wait_for does when its result arrives as it is cancelled.
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return opened
        raise AssertionError("not cancelled")

    with pytest.raises(ClientClosedRequest):
        await until_disconnect(
            _client_that_leaves(0.01), open_stream(), discard=lambda s: s.aclose()
        )
    assert opened.closed


async def test_cancelled_work_is_not_discarded_and_finished_work_is_returned():
    cancelled = False

    async def slow() -> Opened:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled = True
            raise
        return Opened()

    discarded = []
    with pytest.raises(ClientClosedRequest):
        await until_disconnect(
            _client_that_leaves(0.01), slow(), discard=lambda s: discarded.append(s)
        )
    assert cancelled and not discarded

    async def fast() -> str:
        return "answer"

    assert await until_disconnect(_client_that_leaves(1), fast()) == "answer"
