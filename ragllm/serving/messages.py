"""Chat messages and prompts as templates and engines take them."""

from __future__ import annotations

from typing import Any

from ragllm.bounded_json import JsonLimits
from ragllm.errors import InvalidRequest, Unsupported
from ragllm.protocol.openai import ChatMessage
from ragllm.tools.request import arguments_object


def template_message(message: ChatMessage, index: int, limits: JsonLimits) -> dict[str, Any]:
    """A message as chat templates and upstreams take it: role, plain-text content, and an assistant's
    tool calls (arguments as the JSON strings sent) or a tool turn's call id."""
    role = "system" if message.role == "developer" else message.role
    rendered: dict[str, Any] = {"role": role, "content": _text_content(message, index)}
    if role == "tool":
        if not message.tool_call_id:
            raise InvalidRequest(
                "a tool message needs tool_call_id", param=f"messages[{index}].tool_call_id"
            )
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        if role != "assistant":
            raise InvalidRequest(
                "only assistant messages carry tool_calls", param=f"messages[{index}].tool_calls"
            )
        for number, call in enumerate(
            message.tool_calls
        ):  # templates need them as objects: checked now
            arguments_object(
                call.function.arguments,
                f"messages[{index}].tool_calls[{number}].function.arguments",
                limits,
            )
        rendered["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    return rendered


def _text_content(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, dict):  # a part type other than text (image_url, input_audio, ...)
            kind = part.get("type", "unknown")
            raise Unsupported(
                f"content parts of type {kind!r} are not supported; send text",
                param=f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)


def single_prompt(
    prompt: str | list[str] | list[int] | list[list[int]],
) -> tuple[str | None, list[int] | None]:
    """The one prompt of a completions request: its text, or its token ids."""
    if isinstance(prompt, str):
        return prompt, None
    if prompt and all(isinstance(token, int) for token in prompt):
        return None, list(prompt)
    if len(prompt) == 1:
        return single_prompt(prompt[0])
    raise Unsupported(
        "exactly one prompt per request is supported; send several requests instead", param="prompt"
    )
