"""Tool calls as OpenAI streams them and as its messages hold them."""

from __future__ import annotations

import json
import os
from typing import Any


def tool_call_delta(index: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One whole call as a streamed ``tool_calls`` entry (its message form less ``index``)."""
    return {
        "index": index,
        "id": f"call_{os.urandom(12).hex()}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def merge_tool_call_deltas(calls: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    """Fold streamed entries into ``calls`` (message form, in index order): an entry with a new index
    starts a call, later ones of that index extend its arguments (as an upstream streams them)."""
    for entry in entries:
        index = entry.get("index", len(calls))
        function = entry.get("function") or {}
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = calls[index]
        call["id"] = entry.get("id") or call["id"]
        call["function"]["name"] = function.get("name") or call["function"]["name"]
        call["function"]["arguments"] += function.get("arguments") or ""
