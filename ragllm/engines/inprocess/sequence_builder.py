"""From a generation request to the sequences the engine runs: the prompt's token ids (checked
against the model's embedding), each choice's grammar and sampling generator, and how many tokens
its answer may take within the context window. Runs off the event loop (tokenizing is CPU work)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer, StopMatcher
from ragllm.engines.inprocess.prompt_tokens import PromptTokenizer
from ragllm.engines.inprocess.sequence import Sequence
from ragllm.errors import ContextLengthExceeded, EngineFailure
from ragllm.generation import GenerationRequest
from ragllm.structured.closing import Closer, ClosingSearch, ClosingSettings
from ragllm.structured.grammars import Grammar, GrammarCompiler
from ragllm.structured.spec import StructuredOutput
from ragllm.structured.thinking_first import (
    FREE_ANSWER,
    ThinkingGrammar,
    prompt_opens_thinking,
    thinking_markers,
    thinking_tokens,
)


class SequenceBuilder:
    """For one loaded model: ``tokenizer``, the rows of its embedding, the ids that stop an answer,
    its context window and the grammars its structured outputs compile to."""

    def __init__(
        self,
        tokenizer: Any,
        device: Any,
        embedding_rows: int,
        stop_token_ids: frozenset[int],
        max_model_len: int,
        grammars: GrammarCompiler,
        default_max_tokens: int | None,
        closing: ClosingSettings | None = None,
        default_thinking_budget: int = 1024,
    ) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.max_model_len = max_model_len
        self._device = device
        self._embedding_rows = embedding_rows
        self._stop_token_ids = stop_token_ids
        self._default_max_tokens = default_max_tokens
        self.closing = closing  # None: structured answers are cut where their budget ends
        self._closing_search: ClosingSearch | None = None
        self._default_thinking_budget = default_thinking_budget
        self.thinking_markers = thinking_markers(tokenizer)
        self._prompt_tokenizer = PromptTokenizer(tokenizer)
        # A token's own text, for logprobs (decoded once per id, on the engine thread).
        self._token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
        )

    def prompt_and_grammars(
        self, request: GenerationRequest, blocks: Any
    ) -> tuple[list[int], list[Any], list[bytes], list[Closer | None], list[Any]]:
        """Off the event loop in one hop: the prompt's ids, each choice's position in the structured
        output's grammar (None each where there is none), the prompt's block hashes for the
        prefix cache (hashed here rather than on the engine thread, which every stream waits on),
        each choice's closer (``closer``) and the prompt's documents whose KV may be reused at any
        position (``kv.document_store.DocumentSpan``; none unless the request asks)."""
        prompt_ids, spans = self.prompt_ids_and_documents(request)
        thinking = self.thinking_grammar(request, prompt_ids)
        structured = _answer_constraint(request, thinking)
        grammars = (
            [None] * request.params.n
            if structured is None
            else [self.grammars.grammar(structured, thinking) for _ in range(request.params.n)]
        )
        closers = [self.closer(grammar, thinking) for grammar in grammars]
        scope = request.cache_scope.digest()
        hashes = blocks.prompt_hashes(prompt_ids, scope)
        documents = blocks.document_spans(prompt_ids, spans, scope)
        return prompt_ids, grammars, hashes, closers, documents

    def closing_search(self) -> ClosingSearch:
        """The way-out search over this tokenizer, read from its vocabulary on first use (about a
        second: call it off the event loop, as the engine's load does)."""
        if self._closing_search is None:
            self._closing_search = ClosingSearch(
                self.grammars.tokenizer_index(), self.grammars.vocab_size
            )
        return self._closing_search

    def closer(
        self, grammar: Grammar | None, thinking: ThinkingGrammar | None = None
    ) -> Closer | None:
        """What closes ``grammar``'s answer before its budget ends (None: nothing, closing is off, or
        the answer is free text that only bounds its thinking, which has nothing to close). Behind
        ``thinking``, strings are read only from the end-of-thinking marker on."""
        if grammar is None or self.closing is None or grammar.spec == FREE_ANSWER:
            return None
        thinking_end = thinking.markers.close_id if thinking is not None else None
        return Closer(grammar.matcher, self.closing_search(), self.closing, thinking_end)

    def thinking_grammar(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> ThinkingGrammar | None:
        """How the answer's thinking is shaped, where the request expects thinking and this model
        writes it with markers of its own; None where the prompt closed the block (thinking off)."""
        thinking, markers = request.params.thinking, self.thinking_markers
        if thinking is None or markers is None:
            return None
        opened = prompt_opens_thinking(prompt_ids, markers, self.tokenizer.decode)
        if opened is None:
            return None
        max_tokens = self.max_tokens(len(prompt_ids), request.params.max_tokens)
        budget = thinking_tokens(thinking.budget, self._default_thinking_budget, max_tokens, opened)
        return ThinkingGrammar(markers, opened, budget)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self.prompt_ids_and_documents(request)[0]

    def prompt_ids_and_documents(
        self, request: GenerationRequest
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt's ids and the token span of each document it reuses (none unless the request
        lists ``reusable_documents``)."""
        from ragllm.engines.inprocess.loading import chat_prompt_tokens, prompt_token_ids

        spans: list[tuple[int, int]] = []
        if request.messages is not None and request.reusable_documents:
            tokens = chat_prompt_tokens(self.tokenizer, request, self._prompt_tokenizer)
            ids, spans = tokens.ids, tokens.spans
        else:
            ids = prompt_token_ids(self.tokenizer, request, self._prompt_tokenizer)
        # A tokenizer with tokens the model has no embedding for would crash the device (CUDA asserts
        # on an out-of-range index and the context is lost): refuse the request instead.
        if max(ids) >= self._embedding_rows:
            raise EngineFailure(
                f"the tokenizer produced token id {max(ids)}, but the model embeds only "
                f"{self._embedding_rows} tokens: the tokenizer does not match the model"
            )
        return ids, spans

    def new_sequence(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        index: int = 0,
        sink: asyncio.Queue | None = None,
    ) -> Sequence:
        """Choice ``index`` of the request; with a seed it samples with seed + index, as vLLM's do."""
        import torch

        max_tokens = self.max_tokens(len(prompt_ids), request.params.max_tokens)
        generator = None
        if request.params.seed is not None and not request.params.greedy:
            generator = torch.Generator(device=self._device).manual_seed(
                (request.params.seed + index) % 2**64
            )
        return Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            params=request.params,
            max_tokens=max_tokens,
            stop_token_ids=frozenset() if request.params.ignore_eos else self._stop_token_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop_matcher=StopMatcher(request.params.stop),
            sink=sink if sink is not None else asyncio.Queue(),
            generator=generator,
            token_text=self._token_text if request.params.logprobs is not None else None,
            index=index,
            scope_salt=request.cache_scope.digest(),
        )

    def max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        window = self.max_model_len
        room = window - num_prompt_tokens
        if requested is None:
            requested_default = self._default_max_tokens
            if requested_default is not None and room > 0:
                return min(room, requested_default)
            if room <= 0:
                raise ContextLengthExceeded(
                    f"this model's maximum context length is {window} tokens; the prompt has "
                    f"{num_prompt_tokens} tokens, leaving no room for a completion",
                    param="messages",
                )
            return room
        if requested > room:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {window} tokens; you requested "
                f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, "
                f"{requested} for the completion); reduce the prompt or max_tokens",
                param="max_tokens",
            )
        return requested


def _answer_constraint(
    request: GenerationRequest, thinking: ThinkingGrammar | None
) -> StructuredOutput | None:
    """What the answer follows: the request's constraint, or, for a request that only bounds its
    thinking, any token after a bounded thinking."""
    structured = request.params.structured
    if structured is None and thinking is not None and request.params.thinking.budget is not None:
        return FREE_ANSWER
    return structured
