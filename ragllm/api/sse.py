"""Server-sent events straight onto the ASGI ``send`` channel, with cancellation on disconnect and a
bound on clients that stop reading.

Starlette's StreamingResponse costs ~20 us per event more than sending ASGI messages directly, and
every token of every stream passes here, so this response talks ASGI itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ragllm.api.outbox import Outbox
from ragllm.api.outbox_budget import OutboxBudget
from ragllm.api.write_watchdog import WriteWatchdog
from ragllm.errors import ClientClosedRequest

T = TypeVar("T")

# The scope extension through which the server lets a response drop its connection at once and see
# how many bytes its write buffer holds (``ragllm.cli.abortable_http``):
# {"abort": callable, "write_buffer_size": callable}.
ABORT_EXTENSION = "ragllm.connection_abort"

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # keep reverse proxies from buffering the stream
]


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(
    receive: Receive, work: Awaitable[T], discard: Callable[[T], Awaitable[None]] | None = None
) -> T:
    """Await ``work`` but cancel it (and raise ClientClosedRequest) if the client disconnects first.

    Work can finish in spite of its cancellation (Python 3.11's ``asyncio.wait_for`` returns a result
    that arrived as it was cancelled): ``discard`` then undoes what it made (closes a stream it
    opened), or that stream would hold its engine slot for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()  # the work's own cleanup (aborting the engine request) runs on cancellation
    await asyncio.gather(task, return_exceptions=True)
    if discard is not None and not task.cancelled() and task.exception() is None:
        await discard(task.result())
    raise ClientClosedRequest("the client closed the connection before the response was ready")


class EventStreamResponse(Response):
    """Sends the items of ``events`` as body messages, generation decoupled from the socket.

    A producer task pulls ``events`` (the engine's answer) into an ``Outbox`` as fast as they come;
    this task sends from it as fast as the client reads. A client that stops reading therefore frees
    its engine slot once its answer is generated, and is dropped when one write stays blocked for
    ``write_timeout_s``, the backlog reaches ``buffer_bytes``, or ``budget`` (shared by every stream)
    evicts it as the largest holder (generation, if still running, is then cancelled):
    ``on_too_slow(reason)`` records it. A watcher task waits for ``http.disconnect``; when it comes,
    both tasks are cancelled (the engine slot is freed at its next step) and ``on_disconnect`` runs.
    """

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: dict[str, str],
        on_disconnect: Callable[[], None],
        late_headers: Callable[[], dict[str, str]] = dict,
        on_abandon: Callable[[], bytes] = bytes,
        on_too_slow: Callable[[str], None] = lambda reason: None,
        write_timeout_s: float = 30.0,
        buffer_bytes: int = 4 * 1024 * 1024,
        budget: OutboxBudget | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self._events = events
        self._on_disconnect = on_disconnect
        self._on_abandon = on_abandon  # the server stops mid-stream: the stream's last bytes
        self._on_too_slow = on_too_slow
        self._late_headers = late_headers
        self._write_timeout_s = write_timeout_s
        self._buffer_bytes = buffer_bytes
        self._budget = budget
        # Why the sender was cancelled: disconnected, buffer_full, budget_full, write_timeout.
        self._ending: str | None = None
        self.raw_headers = SSE_HEADERS + [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.current_task()
        finished = False

        def end_with(reason: str) -> None:
            if self._ending is None and not finished:
                self._ending = reason
                sender.cancel()

        outbox = Outbox(
            self._buffer_bytes, self._budget, on_evicted=lambda: end_with("budget_full")
        )
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        watcher.add_done_callback(lambda done: done.cancelled() or end_with("disconnected"))
        producer = asyncio.ensure_future(self._produce(outbox, lambda: end_with("buffer_full")))
        watchdog = WriteWatchdog(self._write_timeout_s, lambda: end_with("write_timeout"))
        buffered = scope.get("extensions", {}).get(ABORT_EXTENSION, {}).get("write_buffer_size")
        started = False
        try:
            # Headers wait for the first event, so they can carry what it taught (queue time, TTFT).
            chunk = await outbox.take()
            late = [(k.encode(), v.encode()) for k, v in self._late_headers().items()]
            await watchdog.send(
                send,
                {"type": "http.response.start", "status": 200, "headers": self.raw_headers + late},
            )
            started = True
            while chunk is not None:
                await watchdog.send(
                    send, {"type": "http.response.body", "body": chunk, "more_body": True}
                )
                outbox.sent(buffered() if buffered is not None else None)
                chunk = await outbox.take()
            await watchdog.send(
                send, {"type": "http.response.body", "body": b"", "more_body": False}
            )
        except asyncio.CancelledError:
            if (
                self._ending is None
            ):  # the server is stopping: end the stream properly, then let it go
                producer.cancel()
                if started:
                    with contextlib.suppress(Exception):
                        await watchdog.send(
                            send,
                            {
                                "type": "http.response.body",
                                "body": self._on_abandon(),
                                "more_body": False,
                            },
                        )
                raise
            sender.uncancel()
            if self._ending == "disconnected":
                self._on_disconnect()
            else:
                await self._drop(scope, self._ending)
        except OSError:  # the transport broke while sending
            self._on_disconnect()
        finally:
            finished = True
            watchdog.cancel()
            watcher.cancel()
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            outbox.discard()

    async def _produce(self, outbox: Outbox, on_full: Callable[[], None]) -> None:
        """The answer into the outbox; a full outbox ends it (closing ``events`` cancels generation)."""
        try:
            async for chunk in self._events:
                if not outbox.put(chunk):
                    on_full()
                    return
            outbox.close()
        except Exception as exc:  # before anything was sent, an error is the response's status
            outbox.close(exc)
        finally:
            await _close(self._events)

    async def _drop(self, scope: Scope, reason: str) -> None:
        """Record a client too slow to keep, then drop its connection without flushing (a plain close
        would wait for it to read). Without the abort extension the server closes it when it can."""
        self._on_too_slow(reason)
        abort = scope.get("extensions", {}).get(ABORT_EXTENSION, {}).get("abort")
        if abort is not None:
            abort()
            await asyncio.sleep(0)  # let the server see the connection lost before the app returns


async def _close(events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
