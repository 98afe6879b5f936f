"""The write timeout: only a single send under way for the whole timeout trips it, however long the
stream lasts and however many sends it makes."""

from __future__ import annotations

import asyncio
import time

from ragllm.api.write_watchdog import WriteWatchdog

TIMEOUT_S = 0.1


async def _sent(message: dict) -> None:
    """Test double for a connection that accepts each write at once."""


async def test_a_long_stream_of_prompt_writes_never_times_out():
    timeouts = []
    watchdog = WriteWatchdog(TIMEOUT_S, lambda: timeouts.append(time.monotonic()))
    try:
        deadline = time.monotonic() + 5 * TIMEOUT_S
        while (
            time.monotonic() < deadline
        ):  # waiting between sends (the engine) is not the client's fault
            await watchdog.send(_sent, {})
            await asyncio.sleep(TIMEOUT_S / 3)
        await asyncio.sleep(2 * TIMEOUT_S)
        assert timeouts == []
    finally:
        watchdog.cancel()


async def test_a_send_blocked_past_the_timeout_trips_it_once_and_a_shorter_one_does_not():
    timeouts = []
    watchdog = WriteWatchdog(TIMEOUT_S, lambda: timeouts.append(time.monotonic()))
    try:

        async def slow_to_accept(message: dict) -> None:
            await asyncio.sleep(TIMEOUT_S / 2)

        await watchdog.send(slow_to_accept, {})
        await asyncio.sleep(2 * TIMEOUT_S)
        assert timeouts == []
        blocked = asyncio.Event()

        async def never_accepts(message: dict) -> None:
            await blocked.wait()

        began = time.monotonic()
        stuck = asyncio.ensure_future(watchdog.send(never_accepts, {}))
        await asyncio.sleep(4 * TIMEOUT_S)
        assert len(timeouts) == 1 and TIMEOUT_S <= timeouts[0] - began < 2.5 * TIMEOUT_S
        stuck.cancel()
    finally:
        watchdog.cancel()
