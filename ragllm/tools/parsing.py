"""Reading tool calls out of an answer as it streams.

``feed`` takes the answer's text piece by piece and returns what may be shown as content now and
the calls completed so far; ``finish`` returns the rest. Text that might still turn into a call (a
partial ``<tool_call>`` tag, a call not yet closed, a Llama answer that opens with ``{``) is held
back; whatever does not parse as a call of an offered function is content after all, never lost.
"""

from __future__ import annotations

import json
from typing import Any

from ragllm.bounded_json import JsonLimits, JsonTooComplex, check_structure, try_loads_bounded
from ragllm.structured.spec import DEFAULT_SCHEMA_LIMITS
from ragllm.tools.calls import tool_call_delta
from ragllm.tools.formats import LLAMA3_JSON

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


class ToolCallParser:
    """Splits one answer into content and calls of the functions ``names``."""

    def __init__(
        self,
        tool_format: str,
        names: list[str],
        parallel: bool = True,
        limits: JsonLimits = DEFAULT_SCHEMA_LIMITS,
    ) -> None:
        # A call the model writes is read within the bounds the request's own arguments get; a deeper or
        # larger one (a tenant can force any shape with a regular expression) stays text.
        self._limits = limits
        self._llama = tool_format == LLAMA3_JSON
        self._names = set(names)
        self._parallel = parallel
        self._held = ""  # text not yet shown: maybe the start of a call
        self._inside = False  # between <tool_call> and </tool_call>
        self._undecided = self._llama  # a Llama answer is a call only if it opens with one
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._held += text
        if self._llama:
            return self._feed_llama()
        return self._feed_hermes()

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        held, self._held = self._held, ""
        if self._llama:
            return self._finish_llama(held)
        if (
            self._inside
        ):  # never closed (the answer hit its length): a call only if its JSON is whole
            self._inside = False
            calls = self._calls_from(held)
            return ("" if calls else OPEN + held), calls
        return ("" if self.calls and not held.strip() else held), []

    # -- hermes: <tool_call> blocks anywhere in the answer ----------------------------------------
    def _feed_hermes(self) -> tuple[str, list[dict[str, Any]]]:
        content, calls = [], []
        while True:
            if self._inside:
                end = self._held.find(CLOSE)
                if end < 0:
                    return "".join(content), calls
                block, self._held = self._held[:end], self._held[end + len(CLOSE) :]
                self._inside = False
                found = self._calls_from(block)
                if found:
                    calls += found
                else:
                    content.append(OPEN + block + CLOSE)
                continue
            start = self._held.find(OPEN)
            if start >= 0:
                before = self._held[:start]
                content.append(
                    before.rstrip() if before.strip() else ""
                )  # blanks before a call are not content
                self._held, self._inside = self._held[start + len(OPEN) :], True
                continue
            # Show all but what may begin a tag, and trailing blanks (they may come before a call).
            keep = _partial_tag_length(self._held)
            shown = self._held[: len(self._held) - keep]
            shown_stripped = shown.rstrip()
            content.append(shown_stripped)
            self._held = shown[len(shown_stripped) :] + self._held[len(self._held) - keep :]
            return "".join(content), calls

    # -- llama3_json: the whole answer is a call, or it is content -------------------------------
    def _feed_llama(self) -> tuple[str, list[dict[str, Any]]]:
        if not self._undecided:
            shown, self._held = self._held, ""
            return shown, []
        start = self._held.lstrip()
        if not start:
            return "", []
        if start.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(start):
            return "", []  # may be a call: held to the end
        self._undecided = False
        shown, self._held = self._held, ""
        return shown, []

    def _finish_llama(self, held: str) -> tuple[str, list[dict[str, Any]]]:
        if not self._undecided:
            return held, []
        body = held.strip().removeprefix(PYTHON_TAG).strip()
        calls = []
        decoder = json.JSONDecoder()
        position = 0
        while position < len(body):
            try:
                value, end = decoder.raw_decode(body, position)
                check_structure(value, self._limits)
            except (json.JSONDecodeError, RecursionError, JsonTooComplex):
                return (
                    held,
                    [],
                )  # deeper than any call we would pass on: the answer's text, as written
            call = self._call(value, "parameters")
            if call is None:
                return held, []
            calls.append(call)
            position = end
            while position < len(body) and body[position] in "; \n\t":
                position += 1
        return ("", calls) if calls else (held, [])

    # -- shared ------------------------------------------------------------------------------------
    def _calls_from(self, block: str) -> list[dict[str, Any]]:
        value = try_loads_bounded(block, self._limits)
        call = self._call(value, "arguments")
        return [call] if call is not None else []

    def _call(self, value: Any, arguments_key: str) -> dict[str, Any] | None:
        """A call entry for a parsed object naming an offered function, else None (then content)."""
        if not isinstance(value, dict) or value.get("name") not in self._names:
            return None
        arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
        if not isinstance(arguments, dict):
            return None
        if self.calls and not self._parallel:
            return None  # one call only (parallel_tool_calls false): a second one stays text
        call = tool_call_delta(len(self.calls), value["name"], arguments)
        self.calls.append(call)
        return call


def _partial_tag_length(text: str) -> int:
    """Length of the longest end of ``text`` that begins ``<tool_call>``."""
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-length:]):
            return length
    return 0
