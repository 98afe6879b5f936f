"""A request's sampling fields as the engine takes them: its own values, else the model's defaults,
else OpenAI's; fields the engine cannot honour are refused."""

from __future__ import annotations

from ragllm.errors import InvalidRequest, Unsupported
from ragllm.generation import SamplingParams
from ragllm.protocol.openai import MAX_STOP_SEQUENCES, ChatCompletionRequest, SamplingFields
from ragllm.structured.spec import StructuredOutput

# Sampling fields a request may leave to the model's defaults.
DEFAULTED_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# Choices one request may ask for: each takes an engine slot for its whole answer.
MAX_CHOICES = 8


def sampling_params(
    body: SamplingFields,
    max_tokens: int | None,
    defaults: dict[str, float],
    logprobs: int | None = None,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    """The request's values; where it leaves one out, the model's default, else OpenAI's."""

    def pick(name: str, fallback: float) -> float:
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, fallback)

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=max(0, int(pick("top_k", 0))),
        min_p=pick("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        seed=body.seed,
        stop=stop_strings(body.stop),
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        structured=structured,
        n=body.n or 1,
    )


def sampling_set(body: SamplingFields) -> frozenset[str]:
    """The defaultable fields the request set itself."""
    return frozenset(name for name in DEFAULTED_SAMPLING_FIELDS if getattr(body, name) is not None)


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """OpenAI's pair: ``logprobs: true`` asks for them, ``top_logprobs`` for alternatives too."""
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop"
        )
    return tuple(s for s in stops if s)


def refuse_unsupported_sampling(body: SamplingFields) -> None:
    """Sampling fields of OpenAI's that the engine does not honour, refused rather than ignored."""
    if body.n is not None and body.n > MAX_CHOICES:
        raise InvalidRequest(
            f"n may be at most {MAX_CHOICES}; send several requests for more choices", param="n"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise Unsupported(f"{name} is not supported (use repetition_penalty)", param=name)
    if body.logit_bias:
        raise Unsupported("logit_bias is not supported", param="logit_bias")
