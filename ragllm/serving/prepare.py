"""OpenAI requests turned into engine requests: checked against the request bounds and what the
model can honour (a clear 400 otherwise), RAG documents packed, tools and structured outputs read;
and a prepared request's engine stream opened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ragllm.bounded_json import JsonLimits
from ragllm.config import InputSettings, RagSettings
from ragllm.engines.base import Engine
from ragllm.errors import (
    ContextLengthExceeded,
    EngineNotReady,
    InvalidRequest,
    ModelNotFound,
    Unsupported,
)
from ragllm.generation import (
    CacheScope,
    DeltaStream,
    EngineState,
    GenerationRequest,
    ModelCard,
    SamplingParams,
)
from ragllm.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from ragllm.rag.citations import citation_pattern
from ragllm.rag.contract import RagOptions
from ragllm.rag.packing import DEFAULT_ANSWER_TOKENS, RagContext, off_loop_if
from ragllm.rag.prompt import load_template
from ragllm.serving.bounds import (
    PromptText,
    check_chat,
    check_completion,
    check_detokenize,
    check_tokenize,
)
from ragllm.serving.documents import pack_documents, rendered_documents
from ragllm.serving.messages import single_prompt, template_message
from ragllm.serving.reasoning import thinking_first
from ragllm.serving.sampling import (
    chat_logprobs,
    refuse_unsupported_sampling,
    sampling_params,
    sampling_set,
)
from ragllm.structured.spec import GUIDED_FIELDS, StructuredOutput, structured_output_of
from ragllm.telemetry.metrics import Metrics, RequestTimer
from ragllm.tools.formats import call_constraint
from ragllm.tools.parsing import ToolCallParser
from ragllm.tools.request import ToolUse, tool_use_of
from ragllm.tools.stream import ToolCallStream

# Past this much text, turning messages into the engine's form (parsing tool-call arguments) runs on a
# worker thread, so that the event loop keeps answering others.
LARGE_TEXT_BYTES = 256 * 1024
# Fields an upstream engine receives as the client sent them (documented in the README).
PASSTHROUGH_FIELDS = (
    "response_format",
    "structured_outputs",
    *GUIDED_FIELDS,
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "thinking_token_budget",
)


@dataclass(slots=True)
class PreparedRequest:
    """A validated request with everything the response framing needs."""

    kind: Literal["chat", "completion"]
    id: str
    created: int
    model: ModelCard
    generation: GenerationRequest
    stream: bool
    include_usage: bool
    continuous_usage: bool = (
        False  # every chunk carries the usage so far (vLLM's continuous_usage_stats)
    )
    rag: RagContext | None = None  # the request carried documents
    strip_thinking: bool = False  # remove <think>...</think> from the answer
    tools: ToolUse | None = (
        None  # tools the answer may call, read out of its text by ``tool_parser``
    )


@dataclass(frozen=True, slots=True)
class PreparedTokenize:
    """What /tokenize counts: the prompt as it would run, and, with documents, how they were packed."""

    model: ModelCard
    generation: GenerationRequest
    rag: RagContext | None = None


class RequestPreparer:
    """Prepares OpenAI requests for the engine, and opens the engine's stream for a prepared one."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        bounds: InputSettings | None = None,
        rag: RagSettings | None = None,
    ) -> None:
        """``rag``: the RAG contract's defaults, for fields a request's ``rag`` leaves out."""
        self.engine = engine
        self.metrics = metrics
        self.bounds = bounds or InputSettings()
        self.rag_defaults = rag or RagSettings()
        self.schema_limits = JsonLimits.schema(self.bounds)

    # -- preparing ------------------------------------------------------------------------------
    async def prepare_chat(
        self, body: ChatCompletionRequest, cache_group: str | None = None
    ) -> PreparedRequest:
        """``cache_group``: the caller's (see ``CacheScope``); None with API keys off."""
        text = check_chat(body, self.bounds)
        model = self._model(body.model)
        refuse_unsupported_sampling(body)
        if not body.messages:
            raise InvalidRequest("messages must contain at least one message", param="messages")
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        rag_requested = body.documents is not None or body.rag is not None
        _refuse_unfittable(
            model,
            text,
            max_tokens or (DEFAULT_ANSWER_TOKENS if rag_requested else 1),
            "messages" if max_tokens is None else "max_tokens",
        )
        messages = await off_loop_if(
            text.total > LARGE_TEXT_BYTES, self._template_messages, body.messages
        )
        template_kwargs = dict(body.chat_template_kwargs or {})
        strip_thinking = template_kwargs.get("enable_thinking") is False
        rag_context = None
        options = body.rag or RagOptions()
        thinking = thinking_first(
            model,
            template_kwargs,
            rag_requested and not options.reasoning,
            body.thinking_token_budget,
            max_tokens,
        )
        if rag_requested:
            strip_thinking = strip_thinking or not options.reasoning
            packed = await pack_documents(
                self.engine,
                model,
                messages,
                body.documents or [],
                options,
                template_kwargs,
                max_tokens,
                self.rag_defaults.order,
            )
            messages, template_kwargs, rag_context = (
                packed.messages,
                packed.template_kwargs,
                packed.context,
            )
        request_id = f"chatcmpl-{os.urandom(16).hex()}"
        passthrough = _passthrough(body)
        # Schemas are checked (and tools' parameters) where their size says: off the event loop when large.
        heavy_constraints = text.structure + text.schemas > LARGE_TEXT_BYTES // 8
        structured, tools = await off_loop_if(
            heavy_constraints, self._constraints, body, passthrough
        )
        if tools is not None and tools.must_call and model.tool_call_format is not None:
            structured = _tool_call_constraint(model.tool_call_format, tools, structured)
        if rag_context is not None and rag_context.citations == "constrained":
            structured, passthrough = _constrained_citations(rag_context, structured, passthrough)
        generation = GenerationRequest(
            request_id=request_id,
            params=replace(
                sampling_params(
                    body, max_tokens, model.sampling_defaults, chat_logprobs(body), structured
                ),
                thinking=thinking,
            ),
            messages=messages,
            chat_template_kwargs=template_kwargs or None,
            incremental=bool(body.stream),
            passthrough=passthrough,
            tools=list(tools.functions) if tools is not None else None,
            sampling_set=sampling_set(body),
            cache_scope=CacheScope(cache_group, body.cache_salt),
            document_set=rag_context.document_set if rag_context is not None else None,
            reusable_documents=self._reusable(rag_context, options),
        )
        prepared = self._prepared("chat", request_id, model, generation, body)
        prepared.rag, prepared.strip_thinking, prepared.tools = rag_context, strip_thinking, tools
        return prepared

    def prepare_completion(
        self, body: CompletionRequest, cache_group: str | None = None
    ) -> PreparedRequest:
        text_size = check_completion(body, self.bounds)
        model = self._model(body.model)
        _refuse_unsupported_completion_fields(body)
        request_id = f"cmpl-{os.urandom(16).hex()}"
        text, token_ids = single_prompt(body.prompt)
        if text is not None:
            _refuse_unfittable(
                model,
                text_size,
                body.max_tokens or 1,
                "prompt" if body.max_tokens is None else "max_tokens",
            )
        passthrough = _passthrough(body)
        generation = GenerationRequest(
            request_id=request_id,
            params=sampling_params(
                body,
                body.max_tokens,
                model.sampling_defaults,
                body.logprobs,
                structured_output_of(passthrough or {}, self.schema_limits),
            ),
            prompt=text,
            prompt_token_ids=token_ids,
            incremental=bool(body.stream),
            passthrough=passthrough,
            sampling_set=sampling_set(body),
            cache_scope=CacheScope(cache_group, body.cache_salt),
        )
        return self._prepared("completion", request_id, model, generation, body)

    async def prepare_tokenize(self, body: TokenizeRequest) -> PreparedTokenize:
        """The prompt a chat or completion would run; with documents, packed as the chat completion
        would pack them (its ``max_tokens`` kept for the answer), nothing generated."""
        text = check_tokenize(body, self.bounds)
        model = self._model(body.model)
        if (body.messages is None) == (body.prompt is None):
            raise InvalidRequest("send either messages or prompt", param="messages")
        rag_requested = body.documents is not None or body.rag is not None
        if rag_requested and body.messages is None:
            raise InvalidRequest(
                "documents and rag go with messages, as in a chat completion", param="documents"
            )
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        if rag_requested:
            param = "messages" if max_tokens is None else "max_tokens"
            _refuse_unfittable(model, text, max_tokens or DEFAULT_ANSWER_TOKENS, param)
        elif body.return_token_ids or body.return_token_strs:
            # Ids and strings only for a prompt the model could run (tokenize_answer checks its
            # tokens): megabytes of text would cost seconds, a gigabyte and an answer of tens of MB.
            _refuse_unfittable(model, text, 0, "messages" if body.messages else "prompt")
        messages = None
        if body.messages is not None:
            messages = await off_loop_if(
                text.total > LARGE_TEXT_BYTES, self._template_messages, body.messages
            )
        template_kwargs, rag_context = dict(body.chat_template_kwargs or {}), None
        if rag_requested and messages is not None:
            packed = await pack_documents(
                self.engine,
                model,
                messages,
                body.documents or [],
                body.rag or RagOptions(),
                template_kwargs,
                max_tokens,
                self.rag_defaults.order,
            )
            messages, template_kwargs, rag_context = (
                packed.messages,
                packed.template_kwargs,
                packed.context,
            )
        generation = GenerationRequest(
            "tokenize",
            SamplingParams(),
            messages=messages,
            prompt=body.prompt,
            chat_template_kwargs=template_kwargs or None,
        )
        return PreparedTokenize(model, generation, rag_context)

    def prepare_detokenize(self, body: DetokenizeRequest) -> ModelCard:
        model = self._model(body.model)
        check_detokenize(body, model.max_model_len)
        return model

    def _prepared(
        self,
        kind: Literal["chat", "completion"],
        request_id: str,
        model: ModelCard,
        generation: GenerationRequest,
        body: SamplingFields,
    ) -> PreparedRequest:
        return PreparedRequest(
            kind=kind,
            id=request_id,
            created=int(time.time()),
            model=model,
            generation=generation,
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            continuous_usage=bool(
                body.stream_options
                and body.stream_options.include_usage
                and body.stream_options.continuous_usage_stats
            ),
        )

    def _constraints(
        self, body: ChatCompletionRequest, passthrough: dict[str, Any] | None
    ) -> tuple[StructuredOutput | None, ToolUse | None]:
        return (
            structured_output_of(passthrough or {}, self.schema_limits),
            tool_use_of(body.tools, body.tool_choice, body.parallel_tool_calls, self.schema_limits),
        )

    def _template_messages(self, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        return [
            template_message(message, index, self.schema_limits)
            for index, message in enumerate(messages)
        ]

    def _reusable(self, context: RagContext | None, options: RagOptions) -> tuple[str, ...]:
        """The packed documents whose KV the engine may reuse at any position (rag.kv_reuse, else
        the server's default); none for a request without documents or with reuse off."""
        reuse = options.kv_reuse if options.kv_reuse is not None else self.rag_defaults.kv_reuse
        if context is None or not reuse or not context.used:
            return ()
        return rendered_documents(context)

    def _model(self, name: str) -> ModelCard:
        health = self.engine.health()
        if health.state is not EngineState.READY:
            raise EngineNotReady(health.detail or f"the engine is {health.state.value}")
        for card in self.engine.models():
            if card.id == name:
                return card
        served = ", ".join(card.id for card in self.engine.models()) or "none (still loading)"
        raise ModelNotFound(
            f"the model {name!r} does not exist; served models: {served}", param="model"
        )

    # -- opening --------------------------------------------------------------------------------
    async def open(self, prepared: PreparedRequest) -> tuple[DeltaStream, RequestTimer]:
        """The engine's stream for ``prepared`` (tool calls read out of its text where the engine leaves
        them there), and the timer of its run, started as the engine is asked."""
        timer = self.metrics.request_timer()
        stream = await self.engine.generate(prepared.generation)
        parsers = tool_parser(prepared, self.schema_limits)
        return (ToolCallStream(stream, parsers) if parsers is not None else stream), timer


def tool_parser(
    prepared: PreparedRequest, limits: JsonLimits
) -> Callable[[], ToolCallParser] | None:
    """Makes a reader of tool calls for each choice of an answer the engine returns as raw text;
    None where no tool can be called or the engine reads them itself (an upstream)."""
    tool_format, tools = prepared.model.tool_call_format, prepared.tools
    if tools is None or tool_format is None:
        return None
    return lambda: ToolCallParser(tool_format, tools.names(), tools.parallel, limits)


def _tool_call_constraint(
    tool_format: str, tools: ToolUse, structured: StructuredOutput | None
) -> StructuredOutput:
    """tool_choice "required" or a named function, enforced: the answer is calls, arguments valid."""
    if structured is not None:
        raise InvalidRequest(
            f"a tool_choice that requires a call cannot be combined with {structured.param}: "
            "the answer must be a tool call",
            param="tool_choice",
        )
    return call_constraint(tool_format, tools)


def _constrained_citations(
    context: RagContext,
    structured: StructuredOutput | None,
    passthrough: dict[str, Any] | None,
) -> tuple[StructuredOutput, dict[str, Any]]:
    """The answer may cite only the packed documents, and must cite one unless it declines: as a
    regular expression, enforced in process or by the upstream (vLLM's structured_outputs.regex).
    With rag.reasoning on a thinking model the pattern holds the answer after the thinking."""
    if structured is not None:
        raise InvalidRequest(
            "rag.citations 'constrained' cannot be combined with another structured output "
            f"({structured.param})",
            param="rag.citations",
        )
    pattern = citation_pattern(context.used, load_template(context.template).decline)
    return StructuredOutput("regex", pattern, "rag.citations"), {
        **(passthrough or {}),
        "structured_outputs": {"regex": pattern},
    }


def _passthrough(body: SamplingFields) -> dict[str, Any] | None:
    """The structured-output fields the client set, as sent (an upstream gets them verbatim)."""
    fields = body.model_dump(include=set(PASSTHROUGH_FIELDS), exclude_none=True)
    if fields.get("response_format", {}).get("type") == "text":
        del fields["response_format"]  # the default: nothing to pass on
    return fields or None


def _refuse_unfittable(model: ModelCard, text: PromptText, answer_tokens: int, param: str) -> None:
    """A prompt that cannot fit the context window whatever its tokens, refused from its byte length
    before anything tokenizes it (an 8 MiB message would cost seconds of CPU and a gigabyte of memory
    only to be refused). ``param`` is what the engine's own check would name: ``max_tokens`` where the
    request set it. Engines that do not know their tokens' length (upstreams) count for themselves."""
    if not model.max_token_bytes:
        return
    at_least = text.at_least_tokens(model.max_token_bytes)
    if at_least + answer_tokens > model.max_model_len:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {model.max_model_len} tokens; the prompt's text alone is "
            f"at least {at_least} tokens (no token covers more than {model.max_token_bytes} bytes), before "
            f"{answer_tokens} for the completion; reduce the prompt or max_tokens",
            param=param,
        )


def _refuse_unsupported_completion_fields(body: CompletionRequest) -> None:
    refuse_unsupported_sampling(body)
    if body.echo:
        raise Unsupported("echo is not supported", param="echo")
    if body.suffix is not None:
        raise Unsupported("suffix is not supported", param="suffix")
    if body.best_of not in (None, 1):
        raise Unsupported("only best_of=1 is supported", param="best_of")
