"""OpenAI wire models (requests and documented responses). Dumb on purpose: no behaviour here.

Fields OpenAI defines are spelled as OpenAI spells them; our extensions (``top_k``, ``min_p``,
``repetition_penalty``) are extra optional fields, described in the OpenAPI schema. Unknown fields are
ignored, as vLLM does, so clients that send newer OpenAI fields keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragllm.rag.contract import DryRunReport, RagDocument, RagOptions, RagReport

MAX_STOP_SEQUENCES = 16
MAX_CACHE_SALT_CHARS = 256
MAX_INT32 = 2**31 - 1
# Token ids one /detokenize may carry whatever the model (a served model's own max_model_len is the
# tighter bound): past it a list is refused while it is validated, not after.
MAX_DETOKENIZE_TOKENS = 1 << 20
# Request lists stop at their first invalid item: validation would otherwise build one error per
# item, 0.3 s of the event loop for a list of 100,000 wrong values, only to report the first.
FAIL_FAST = Field(fail_fast=True)
Strings = Annotated[list[str], FAIL_FAST]
TokenIds = Annotated[list[int], FAIL_FAST]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContentPart(_Wire):
    type: Literal["text"]
    text: str


class FunctionCall(_Wire):
    name: str
    arguments: str = Field(description="The arguments as a JSON object, encoded as a string.")


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextContentPart | dict[str, Any]], FAIL_FAST] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], FAIL_FAST] | None = Field(
        None, description="An assistant turn's calls of the request's tools."
    )
    tool_call_id: str | None = Field(
        None, description="A tool turn: the call whose result it carries."
    )


class StreamOptions(_Wire):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False,
        description="vLLM's extension: with include_usage, every chunk carries the usage so far "
        "(a client or gateway that leaves early knows what the answer cost).",
    )


class ResponseFormat(_Wire):
    type: str = Field(description="'text', 'json_object' or 'json_schema'.")
    json_schema: dict[str, Any] | None = Field(
        None,
        description="With type 'json_schema': {name, schema, strict}; the answer follows the schema.",
    )


class SamplingFields(_Wire):
    """Fields shared by chat and text completions."""

    model: str = Field(description="A model id from GET /v1/models.")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_INT32, description="Upper bound on generated tokens."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0 means greedy decoding; otherwise at least 0.01."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=128, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Strings | None = Field(
        None,
        description="Up to 16 stop strings (256 characters each by "
        "default), never included in the output.",
    )
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Makes sampling reproducible."
    )
    user: str | None = None
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Only 0 is supported."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Only 0 is supported."
    )
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; must be empty.")
    # Extensions beyond OpenAI's API (as in vLLM):
    top_k: int | None = Field(
        None,
        ge=-1,
        le=MAX_INT32,
        description="Extension: sample among the k most likely tokens; -1 or 0 = off.",
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Extension: drop tokens below min_p × the top probability.",
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=10.0,
        description="Extension: CTRL-style penalty on tokens already present; 1 = off; "
        "at least 0.01.",
    )
    ignore_eos: bool | None = Field(
        None, description="Extension: keep generating past end-of-sequence tokens (for benchmarks)."
    )
    structured_outputs: dict[str, Any] | None = Field(
        None,
        description="Extension (as in vLLM): constrain the answer to one of json (a JSON Schema), "
        "json_object, regex, choice (a list of strings) or grammar (Lark or GBNF).",
    )
    guided_json: dict[str, Any] | str | None = Field(
        None, description="Extension: vLLM's older structured_outputs.json."
    )
    guided_regex: str | None = Field(
        None, description="Extension: vLLM's older structured_outputs.regex."
    )
    guided_choice: Strings | None = Field(
        None, description="Extension: vLLM's older structured_outputs.choice."
    )
    guided_grammar: str | None = Field(
        None, description="Extension: vLLM's older structured_outputs.grammar."
    )
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CACHE_SALT_CHARS,
        strict=True,
        description="Extension (as in vLLM): prefix-cache blocks are shared only with requests of the same "
        "salt, within the caller's own cache group (never another tenant's); 1 to 256 characters, not "
        "all blank.",
    )


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], FAIL_FAST]
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_INT32, description="Preferred spelling of max_tokens."
    )
    logprobs: bool | None = Field(
        None, description="Return each token's log probability (in-process engine)."
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="With logprobs: the most likely alternatives at each position, up to 20.",
    )
    response_format: ResponseFormat | None = Field(
        None,
        description="{'type': 'json_schema', 'json_schema': {...}} or {'type': 'json_object'} constrain the "
        "answer (enforced token by token in the in-process engine; passed on upstream).",
    )
    tools: Annotated[list[dict[str, Any]], FAIL_FAST] | None = Field(
        None,
        description="Functions the model may call: [{'type': 'function', 'function': {name, description, "
        "parameters}}], at most 128.",
    )
    tool_choice: Any = Field(
        None,
        description="'none', 'auto' (the default with tools), 'required', or "
        "{'type': 'function', 'function': {'name': ...}}; the last two are "
        "enforced, so arguments always validate (in-process engine).",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one call per answer."
    )
    # Extensions: the RAG contract (see the README) and template switches.
    documents: Annotated[list[RagDocument], FAIL_FAST] | None = Field(
        None,
        description="Extension: retrieved documents; the RAG template renders them and the answer's "
        "[id] citations are checked against them.",
    )
    rag: RagOptions | None = Field(
        None, description="Extension: RAG options (template, budget, reasoning)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="Extension: switches passed to the chat template: enable_thinking, thinking, "
        "reasoning_effort (chat_template only where the server allows it).",
    )
    thinking_token_budget: int | None = Field(
        None,
        ge=0,
        le=MAX_INT32,
        description="Extension (as in vLLM): tokens a thinking model may think before </think> is "
        "forced; less than max_tokens. A structured answer (response_format, constrained "
        "citations, required tools) follows the thinking; without this field the engine's "
        "default budget applies to those (at most half of max_tokens).",
    )


class CompletionRequest(SamplingFields):
    prompt: str | Strings | TokenIds | Annotated[list[TokenIds], FAIL_FAST] = Field(
        description="One prompt: a string or a list of token ids (a one-element list of either is accepted)."
    )
    echo: bool | None = Field(False, description="Not supported; must be false.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="Return each token's log probability and this "
        "many alternatives (in-process engine).",
    )
    suffix: str | None = Field(None, description="Not supported; must be null.")
    best_of: int | None = Field(None, description="Only 1 is supported.")


# -- responses (documentation for the OpenAPI schema; responses are encoded with orjson) -------------
class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(_Wire):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls.")
    refusal: None = None
    tool_calls: list[ToolCall] | None = Field(
        None, description="Present when the answer calls tools."
    )


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Wire):
    content: list[TokenLogprobEntry]
    refusal: None = None


class ChatChoice(_Wire):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class StructuredReport(_Wire):
    """The ``structured`` object of a response (in a stream: of its last finish event)."""

    closed_early: list[int] = Field(
        description="The choices whose budget (max_tokens or the context's end) was ending, so "
        "their answer was closed under its structured output or tool-call grammar: complete "
        "(it parses), with finish_reason 'length'."
    )


_STRUCTURED_DOC = (
    "Extension: present when a structured answer was closed early because its budget was ending "
    "(in-process engine; also said by the x-ragllm-closed-early header of a whole answer)."
)


class ChatCompletion(_Wire):
    rag: RagReport | None = Field(
        None, description="Extension: present when the request carried documents."
    )
    structured: StructuredReport | None = Field(None, description=_STRUCTURED_DOC)
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Wire):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Wire):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(_Wire):
    structured: StructuredReport | None = Field(None, description=_STRUCTURED_DOC)
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelObject(_Wire):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int = Field(description="Extension: the model's context window in tokens.")


class ModelList(_Wire):
    object: Literal["list"]
    data: list[ModelObject]


class ErrorDetail(_Wire):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Wire):
    error: ErrorDetail


class TokenizeRequest(_Wire):
    """vLLM's /tokenize: count the tokens of a chat (template applied) or of a prompt; with
    ``documents``, a dry run of the RAG packing the same chat completion would do."""

    model: str
    messages: Annotated[list[ChatMessage], FAIL_FAST] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_ids: bool = Field(
        False, description="Extension: also return the prompt's token ids as tokens."
    )
    return_token_strs: bool = Field(
        False, description="As in vLLM: also return each token's string as token_strs."
    )
    documents: Annotated[list[RagDocument], FAIL_FAST] | None = Field(
        None,
        description="Extension: retrieved documents, as in a chat completion: the response's rag "
        "object says which would be packed and which dropped, without generating.",
    )
    rag: RagOptions | None = Field(
        None, description="Extension: RAG options, as in a chat completion."
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_INT32,
        description="Extension: with documents, the room the chat completion keeps for its answer.",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_INT32, description="Preferred spelling of max_tokens."
    )


class TokenizeResponse(_Wire):
    count: int
    max_model_len: int
    tokens: list[int] | None = Field(
        None, description="With return_token_ids (or return_token_strs): the prompt's token ids."
    )
    token_strs: list[str] | None = Field(
        None, description="With return_token_strs: each token's string."
    )
    rag: DryRunReport | None = Field(
        None, description="Extension: present when the request carried documents or rag."
    )


class DetokenizeRequest(_Wire):
    """vLLM's /detokenize: token ids back to text (special tokens written out)."""

    model: str
    tokens: Annotated[
        list[Annotated[int, Field(strict=True, ge=0, le=MAX_INT32)]],
        Field(max_length=MAX_DETOKENIZE_TOKENS, fail_fast=True),
    ] = Field(
        description=f"Token ids of the model's vocabulary; at most the model's context length "
        f"(max_model_len) and never more than {MAX_DETOKENIZE_TOKENS}."
    )


class DetokenizeResponse(_Wire):
    prompt: str


class DocumentStoreHealth(_Wire):
    """Documents' KV kept for reuse at any position (rag.kv_reuse), counted since start."""

    blocks: int = Field(description="KV blocks holding stored documents now (evictable).")
    hits: int = Field(description="Documents reused from the store.")
    misses: int = Field(description="Documents computed and stored.")
    tokens_reused: int = Field(description="Reused documents' tokens kept as stored.")
    tokens_recomputed: int = Field(description="Reused documents' tokens computed again to blend.")


class KVCacheHealth(_Wire):
    block_size: int
    blocks_total: int
    blocks_free: int
    usage: float
    prefix_cache_hit_rate: float | None = Field(
        description="Prompt tokens found cached / looked up so far."
    )
    preemptions: int
    dtype: str = Field(
        "", description="What the cache stores: the model's dtype, or float8_e4m3fn."
    )
    tokens_total: int = Field(
        0, description="Positions the whole pool holds (blocks_total × block_size)."
    )
    document_store: DocumentStoreHealth | None = None


class HealthResponse(_Wire):
    status: Literal["ok", "loading", "error", "draining"]
    model: str
    engine: str
    uptime_s: float
    detail: str = ""
    running: int = 0
    waiting: int = 0
    redis: Literal["ok", "degraded", "disabled"] = "disabled"
    cache: str = "memory"
    kv_cache: KVCacheHealth | None = Field(None, description="The in-process engine's KV blocks.")
