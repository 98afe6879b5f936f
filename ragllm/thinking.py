"""Thinking models' ``<think>...</think>`` blocks, removed from answers that did not ask for reasoning
(a RAG request without ``rag.reasoning``, a request whose template turned thinking off), and the
answer told apart from its thinking where the thinking is kept (citations are read from the answer)."""

from __future__ import annotations

from ragllm.held_text import partial_suffix_length


class ThinkStripper:
    """Removes ``<think>...</think>`` from streamed text, holding back what could be a tag's start,
    and the blank space a thinking block leaves before the answer."""

    _OPEN, _CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self._pending = ""
        self._thinking = False
        self._at_start = True

    def feed(self, text: str) -> str:
        buffer, out = self._pending + text, []
        self._pending = ""
        while buffer:
            tag = self._CLOSE if self._thinking else self._OPEN
            index = buffer.find(tag)
            if index >= 0:
                if not self._thinking:
                    out.append(buffer[:index])
                buffer = buffer[index + len(tag) :]
                self._thinking = not self._thinking
                continue
            held = partial_suffix_length(buffer, (tag,))
            if not self._thinking:
                out.append(buffer[: len(buffer) - held])
            self._pending = buffer[len(buffer) - held :]
            break
        return self._trim_start("".join(out))

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return "" if self._thinking else self._trim_start(pending)

    def _trim_start(self, text: str) -> str:
        if self._at_start:
            text = text.lstrip()
            self._at_start = not text
        return text


def strip_thinking(text: str) -> str:
    stripper = ThinkStripper()
    return stripper.feed(text) + stripper.flush()


def answer_after_thinking(text: str) -> str:
    """``text`` without its thinking: what follows the first ``</think>`` (a template may open the
    block in the prompt, so the answer need not hold ``<think>``), else ``text`` less any block."""
    _, closed, answer = text.partition(ThinkStripper._CLOSE)
    return answer.lstrip() if closed else strip_thinking(text)
