"""The outbox between a stream's generation and its client: what goes in comes out, in order, in as
few writes as the client's pace allows, and the backlog stays bounded whatever the chunk sizes."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragllm.api.outbox import Outbox
from ragllm.errors import EngineFailure

chunks = st.lists(st.binary(min_size=0, max_size=3000), max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    chunks=chunks,
    max_bytes=st.integers(min_value=1, max_value=20_000),
    take_every=st.integers(min_value=1, max_value=10),
)
def test_bytes_come_out_in_order_and_the_backlog_stays_bounded(chunks, max_bytes, take_every):
    async def run() -> None:
        outbox = Outbox(max_bytes)
        accepted: list[bytes] = []
        taken = b""
        for count, chunk in enumerate(chunks, 1):
            backlog = outbox.num_bytes
            if outbox.put(chunk):
                accepted.append(chunk)
                assert backlog < max_bytes  # refused only once the bound is reached
            else:
                assert backlog >= max_bytes and outbox.num_bytes == backlog
            assert outbox.num_bytes < max_bytes + max(len(c) for c in chunks)
            if count % take_every == 0 and outbox.num_bytes:
                taken += await outbox.take()  # a client that reads now and then
        outbox.close()
        while (chunk := await outbox.take()) is not None:
            taken += chunk
        assert taken == b"".join(accepted)

    asyncio.run(run())


async def test_a_waiting_sender_wakes_for_the_next_chunk_and_for_the_end():
    outbox = Outbox(1024)
    waiting = asyncio.ensure_future(outbox.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    outbox.put(b"data: 1\n\n")
    assert await waiting == b"data: 1\n\n"
    waiting = asyncio.ensure_future(outbox.take())
    await asyncio.sleep(0)
    outbox.close()
    assert await waiting is None


async def test_an_error_comes_after_what_was_queued_before_it():
    outbox = Outbox(1024)
    outbox.put(b"a")
    outbox.close(EngineFailure("broken"))
    assert await outbox.take() == b"a"
    with pytest.raises(EngineFailure):
        await outbox.take()
