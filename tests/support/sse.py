"""Reading a whole SSE answer over raw HTTP, byte for byte (the SDK hides how a stream ends)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx

DONE = b"data: [DONE]\n\n"


@dataclass
class StreamResult:
    status: int
    raw: bytes
    text: str = ""
    finish_reason: str | None = None
    error: dict | None = (
        None  # the error object of an in-band error event (or of a refused request)
    )
    events: list[dict] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ends_with_done(self) -> bool:
        return self.raw.endswith(DONE)


def parse(status: int, raw: bytes) -> StreamResult:
    result = StreamResult(status, raw)
    if status != 200:
        result.error = json.loads(raw).get("error")
        return result
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        result.events.append(event)
        if "error" in event:
            result.error = event["error"]
        for choice in event.get("choices") or ():
            result.text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
    return result


def post_stream(
    url: str,
    payload: dict,
    headers: dict | None = None,
    path: str = "/v1/chat/completions",
    timeout: float = 120,
) -> StreamResult:
    with httpx.stream(
        "POST", f"{url}{path}", json=payload, headers=headers, timeout=timeout
    ) as response:
        result = parse(response.status_code, response.read())
        result.headers = dict(response.headers)
        return result
