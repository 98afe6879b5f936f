"""Server-sent events straight onto the ASGI ``send`` channel, with cancellation on disconnect.

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

from ragllm.errors import ClientClosedRequest

T = TypeVar("T")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # keep reverse proxies from buffering the stream
]


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T],
                           discard: Callable[[T], Awaitable[None]] | None = None) -> T:
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
    """Sends each item of ``events`` as one body message; ``on_disconnect`` runs if the client leaves.

    A watcher task waits for ``http.disconnect``; when it comes, the sending task is cancelled at
    whatever it awaits (often the engine's next delta), so the engine slot is freed at its next step.
    """

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str],
                 on_disconnect: Callable[[], None],
                 late_headers: Callable[[], dict[str, str]] = dict,
                 on_abandon: Callable[[], bytes] = bytes) -> None:
        self.status_code = 200
        self.background = None
        self._events = events
        self._on_disconnect = on_disconnect
        self._on_abandon = on_abandon  # the server stops mid-stream: the stream's last bytes
        self._late_headers = late_headers
        self.raw_headers = SSE_HEADERS + [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.current_task()
        disconnected = finished = False

        def cancel_sender(watcher: asyncio.Future) -> None:
            nonlocal disconnected
            if not watcher.cancelled() and not finished:
                disconnected = True
                sender.cancel()

        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        watcher.add_done_callback(cancel_sender)
        started = False
        try:
            # Headers wait for the first event, so they can carry what it taught (queue time, TTFT).
            first = await anext(aiter(self._events), None)
            late = [(k.encode(), v.encode()) for k, v in self._late_headers().items()]
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers + late})
            started = True
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:  # the server is stopping: end the stream properly, then let it go
                if started:
                    with contextlib.suppress(Exception):
                        await send({"type": "http.response.body", "body": self._on_abandon(), "more_body": False})
                raise
            sender.uncancel()
            self._on_disconnect()
        except OSError:  # the transport broke while sending
            self._on_disconnect()
        finally:
            finished = True
            watcher.cancel()
            await _close(self._events)


async def _close(events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
