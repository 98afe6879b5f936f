"""The budget every outbox shares: the bytes held for clients stay within it whatever the streams do,
overflow evicts the streams holding the most (never a client that keeps up while another holds more),
and a stream either delivers every byte it accepted or is told, once, that it was evicted."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from ragllm.api.outbox import Outbox
from ragllm.api.outbox_budget import OutboxBudget

# (stream, action, chunk size): put a chunk, or take what is queued and send it (a client reading).
operations = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["put", "put", "send"]), st.integers(1, 3000)),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(operations=operations, max_bytes=st.integers(4096, 30_000))
def test_held_bytes_stay_within_the_budget_and_evicted_streams_are_told_once(operations, max_bytes):
    async def run() -> None:
        budget = OutboxBudget(max_bytes)
        evictions = [0] * 6
        outboxes = [
            Outbox(8192, budget, on_evicted=lambda i=i: evictions.__setitem__(i, evictions[i] + 1))
            for i in range(6)
        ]
        accepted: list[list[bytes]] = [[] for _ in outboxes]
        delivered = [b""] * len(outboxes)
        for index, action, size in operations:
            outbox = outboxes[index]
            if action == "put":
                others = {
                    i: o.num_held for i, o in enumerate(outboxes) if i != index and not o.evicted
                }
                putter_held = outbox.num_held + size
                chunk = bytes([index]) * size
                if outbox.put(chunk):
                    accepted[index].append(chunk)
                for i, held in others.items():
                    if outboxes[i].evicted:  # the largest go first: none held less than the putter
                        assert held >= putter_held
            elif outbox.num_bytes:
                delivered[index] += await outbox.take()
                outbox.sent()
            live = [o for o in outboxes if not o.evicted]
            assert budget.num_bytes == sum(o.num_held for o in live) <= max_bytes
        for index, outbox in enumerate(outboxes):
            assert evictions[index] == int(outbox.evicted)
            if not outbox.evicted:  # nothing it accepted is lost: the rest is still queued
                outbox.close()
                while (chunk := await outbox.take()) is not None:
                    delivered[index] += chunk
                assert delivered[index] == b"".join(accepted[index])
            outbox.discard()
        assert budget.num_bytes == 0 and budget.num_outboxes == 0

    asyncio.run(run())


async def test_a_client_that_keeps_up_is_never_evicted_by_clients_that_stopped_reading():
    budget = OutboxBudget(64 * 1024)
    evicted: list[str] = []
    reader = Outbox(16 * 1024, budget, on_evicted=lambda: evicted.append("reader"))
    non_readers = [
        Outbox(16 * 1024, budget, on_evicted=lambda i=i: evicted.append(f"non-reader {i}"))
        for i in range(20)
    ]
    received = b""
    for step in range(40):  # every stream gets an event of 2 KB a step; only the reader reads it
        for index, outbox in enumerate(non_readers):
            outbox.put(b"n" * 2048)
        assert reader.put(b"r" * 2048)
        received += await reader.take()
        reader.sent()
        assert budget.num_bytes <= budget.max_bytes
    assert "reader" not in evicted and received == b"r" * 2048 * 40
    assert len(evicted) >= 20 - 64 // 16 and budget.num_evicted == len(evicted)
    assert (
        reader.num_held <= 2 * 2048
    )  # its last event, and the one before perhaps still in the connection


async def test_a_stream_larger_than_the_whole_budget_evicts_itself():
    budget = OutboxBudget(4096)
    evicted = []
    outbox = Outbox(1 << 20, budget, on_evicted=lambda: evicted.append(True))
    assert not outbox.put(b"x" * 5000)
    assert evicted == [True] and outbox.num_held == 0 and budget.num_bytes == 0
    assert not outbox.put(b"y")  # an evicted outbox takes nothing more
