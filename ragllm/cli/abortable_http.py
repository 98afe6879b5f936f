"""uvicorn's HTTP/1.1 protocol, taught to drop a connection at once.

An ASGI app can end a response but not a connection: when an app gives up mid-response uvicorn calls
``transport.close()``, which first flushes what is buffered, and a client that never reads keeps that
connection (and its buffered bytes) forever. This protocol puts its transport's ``abort`` into every
request's scope, under ``scope["extensions"][ABORT_EXTENSION]["abort"]``, so a stream can drop a client
that stopped reading (``ragllm.api.sse``), and the transport's ``get_write_buffer_size`` under
``"write_buffer_size"``, so the bytes waiting there count in the process's outbox budget.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ragllm.api.sse import ABORT_EXTENSION


class AbortableHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """httptools' protocol when installed, else h11's (uvicorn's own choice), plus the abort extension."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        # uvicorn's protocols start each request's app from ``self.app``: one wrapper per connection.
        self.app = _with_abort(self.app, transport)  # type: ignore[attr-defined]


def _with_abort(app: Any, transport: Any) -> Any:
    extension = {"abort": transport.abort, "write_buffer_size": transport.get_write_buffer_size}

    async def app_with_abort(scope: Any, receive: Any, send: Any) -> None:
        scope["extensions"] = {**scope.get("extensions", {}), ABORT_EXTENSION: extension}
        await app(scope, receive, send)

    return app_with_abort
