"""The vocabulary every layer shares: what a generation asks for (``GenerationRequest``,
``SamplingParams``, ``CacheScope``), what comes back (``DeltaStream`` of ``Delta``, ``Usage``,
``TokenLogprob``, ``FinishReason``) and what an engine reports about itself (``EngineHealth``, ``EngineStats``,
``KVCacheStats``, ``ModelCard``). Plain data, no behaviour beyond small derived values: the API, the
service and every engine import it; it imports nothing of theirs.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ragllm.structured.spec import StructuredOutput
from ragllm.structured.thinking_first import ThinkingFirst


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context window
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (benchmarks)
    # None: no log probabilities; k: each token's, with the k most likely alternatives (0 to 20).
    logprobs: int | None = None
    structured: StructuredOutput | None = (
        None  # the answer must follow this schema, pattern or grammar
    )
    n: int = 1  # choices, each sampled from the same prompt (choice i with seed + i)
    # The answer opens with the model's thinking: ``structured`` holds only what follows it, and the
    # thinking is bounded (structured/thinking_first.py). None: no thinking expected.
    thinking: ThinkingFirst | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class CacheScope:
    """Who may share a request's cached prompt work (prefix-cache KV blocks, here or upstream).

    A cache hit is visible (``cached_tokens``, a faster first token), so a shared cache tells one
    tenant what another sent; requests of different scopes never share. ``group`` is the tenant's
    cache group (its API key's id unless the key file names a shared group; None with API keys off:
    one scope for all); ``salt`` is the client's own ``cache_salt``, which narrows its group's scope
    and can never widen it into another group's.
    """

    group: str | None = None
    salt: str | None = None

    @property
    def isolated(self) -> bool:
        return self.group is not None or self.salt is not None

    def digest(self) -> bytes:
        """32 bytes naming the scope (empty for the unscoped one); JSON-encoded before hashing so no
        choice of ``salt`` can spell another group's (group "a", salt "b:c" vs group "a:b", salt "c")."""
        if not self.isolated:
            return b""
        return hashlib.sha256(json.dumps([self.group, self.salt]).encode()).digest()


# The key of ``chat_template_kwargs`` whose value is a template of the request's own (where the
# server allows one), not content: the in-process engine renders it as given rather than escaped.
REQUEST_TEMPLATE_KEY = "chat_template"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A chat (``messages``) or a completion (``prompt`` text or token ids), never both."""

    request_id: str
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": False}
    # False: only the whole answer matters (a non-streaming client); an upstream is then asked for
    # it in one piece rather than token by token, which spares parsing one event per token.
    incremental: bool = True
    # Fields passed to an upstream as the client sent them (response_format, structured_outputs, tools,
    # ...); the in-process engine reads their meaning from ``params`` and ``tools`` instead.
    passthrough: dict[str, Any] | None = None
    # The functions the chat template renders into the prompt (in-process engine).
    tools: list[dict[str, Any]] | None = None
    # Sampling fields the client set; the rest hold defaults. An upstream is sent only these, so its
    # own model's defaults (its generation config) apply to the rest, as they would if called directly.
    sampling_set: frozenset[str] = frozenset()
    # Which requests may share this one's cached prompt work (see ``CacheScope``).
    cache_scope: CacheScope = CacheScope()
    # A RAG request's packed documents as a set (``ragllm.rag.document_set``): an upstream router
    # keeps requests with the same set on one replica, whatever their question or the order the
    # documents render in. None: the router keys on the prompt's head.
    document_set: str | None = None
    # The packed documents as the prompt renders them, in its order, when the request reuses their
    # KV at any position (``rag.kv_reuse``): the in-process engine finds each in the rendered prompt,
    # tokenizes it on its own and keeps or reuses its KV (``engines/inprocess/kv/document_store``).
    # Empty: no reuse. An upstream ignores them.
    reusable_documents: tuple[str, ...] = ()


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"  # the answer ended with calls of the request's tools


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log probability under the model (before temperature and filtering, as
    vLLM reports them by default), with the most likely alternatives at that position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(slots=True)
class Delta:
    """New text for one choice of a request since its previous delta.

    ``num_tokens`` counts the tokens generated since the previous delta (text may lag tokens when a
    multi-byte character or a possible stop string is held back). A choice's last delta has a
    ``finish_reason`` and the choice's final ``completion_tokens``; ``prompt_tokens`` is the
    request's prompt, counted once however many choices share it.
    """

    text: str
    num_tokens: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    queue_time_s: float | None = None  # set on the first delta
    logprobs: list[TokenLogprob] | None = (
        None  # the tokens since the previous delta, when asked for
    )
    index: int = (
        0  # which choice (of the request's ``n``) the delta belongs to; each finishes on its own
    )
    # Tool calls, as OpenAI streams them ({"index", "id", "type", "function": {"name", "arguments"}};
    # a relayed upstream may split one call over several entries of the same index).
    tool_calls: list[dict[str, Any]] | None = None
    cached_tokens: int = 0  # of ``prompt_tokens``, those whose KV came from the prefix cache
    # The answer was closed early under its grammar because its budget was ending: it is complete
    # (it parses), and its finish_reason is "length".
    closed_early: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens an engine spent on one request: what is billed, whether or not the client read them."""

    prompt_tokens: int = (
        0  # the prompt, once its prefill started (a request aborted in the queue: 0)
    )
    completion_tokens: int = 0  # every choice's tokens sampled so far

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A prompt's token ids as the engine would run them, and each id's token string when asked."""

    ids: list[int]
    strings: list[str] | None = None


class DeltaStream(abc.ABC):
    """An admitted generation; iterate for deltas, ``aclose()`` to cancel and free its slot."""

    request_id: str

    def produced(self) -> Usage | None:
        """What the engine has spent on this request so far, read at any time (after ``aclose()`` too):
        tokens sampled but not yet iterated (or never, the client having left) count. None where the
        engine cannot tell; the service then bills the deltas it iterated."""
        return None

    async def settled(self) -> None:
        """Returns once ``produced()`` is final (after ``aclose()``, the engine may still be finishing
        a step for the request); at once for engines whose count is final when the stream closes."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[Delta]: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def scrape_metrics(self) -> list[tuple[str, str]]:
        """(source, Prometheus text) of engines that export their own metrics (a vLLM upstream)."""
        return []


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    BROKEN = "broken"


@dataclass(slots=True)
class EngineHealth:
    state: EngineState
    detail: str = ""
    # Broken in a way only a new process mends (a device error, a stalled engine thread); an
    # unreachable upstream, by contrast, mends itself.
    restart_needed: bool = False


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache: KVCacheStats | None = None  # engines that hold a KV cache themselves
    # Tokens the engine itself counted as made for clients since it started (the prompt of each
    # request whose prefill started, every token sampled), independent of what requests were billed.
    produced: Usage | None = None


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    """The in-process engine's KV blocks, and its prefix cache and preemption counts so far."""

    block_size: int
    blocks_total: int
    blocks_free: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found cached
    num_preemptions: int
    dtype: str = ""  # what the cache stores
    # Document KV reuse (rag.kv_reuse): documents found stored and reused, documents computed and
    # stored, their tokens reused as stored and recomputed by blending, and blocks the store holds.
    document_hits: int = 0
    document_misses: int = 0
    document_tokens_reused: int = 0
    document_tokens_recomputed: int = 0
    document_blocks: int = 0

    @property
    def usage(self) -> float:
        return 1.0 - self.blocks_free / self.blocks_total if self.blocks_total else 0.0


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    max_model_len: int
    owned_by: str = "ragllm"
    fingerprint: str = ""
    # The model's own sampling defaults (its generation config), used for fields a request leaves out.
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # The chat template has a thinking switch (``enable_thinking``, as Qwen3's do).
    thinking_switch: bool = False
    # The model writes its thinking between ``<think>`` and ``</think>``, each a token of its own
    # vocabulary (in-process engine; False where unknown: an upstream keeps its own reasoning parser).
    thinks: bool = False
    # The model understands a trailing ``/no_think`` in the user turn (set per model in settings).
    no_think_suffix: bool = False
    # UTF-8 bytes of the vocabulary's longest token (None: unknown): a lower bound on the tokens a
    # text needs, known without tokenizing it.
    max_token_bytes: int | None = None
    # How the model writes tool calls ("hermes", "llama3_json"), read out of its answers here; None
    # where the engine returns calls already parsed (an upstream).
    tool_call_format: str | None = None
