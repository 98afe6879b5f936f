"""The in-process engine: a transformers model on CPU or CUDA with continuous batching.

The event loop only validates, tokenises (on a worker thread) and queues; the model runs on the
scheduler's thread, which hands each step's deltas back to the loop in one call.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ragllm import __version__
from ragllm.config import EngineSettings, Settings
from ragllm.generation import Delta, EngineHealth, EngineState, EngineStats, GenerationRequest, KVCacheStats, ModelCard, SamplingParams, Usage
from ragllm.generation import DeltaStream
from ragllm.engines.base import Engine
from ragllm.engines.inprocess.prompt_tokens import PromptTokenizer
from ragllm.engines.inprocess.sequence import Sequence
from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer, StopMatcher
from ragllm.structured.grammars import GrammarCompiler
from ragllm.tools.formats import format_of_template
from ragllm.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineNotReady,
    EngineOverloaded,
    InvalidRequest,
    RagLLMError,
)

logger = logging.getLogger(__name__)
GIL_SWITCH_INTERVAL_S = 0.0005
# While a left request's billing waits for the engine to confirm its abort, how often it checks that
# the engine thread is still there to confirm it.
ABORT_POLL_S = 0.5


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._health = EngineHealth(EngineState.LOADING, "model is loading")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.worker: Any = None  # the engine thread (``worker.Worker``), made once the model loads
        self._tokenizer: Any = None
        self._device: Any = None
        self.dtype_name = ""
        self._card: ModelCard | None = None
        self._stop_token_ids: frozenset[int] = frozenset()
        self._embedding_rows = 0
        self._admitted = 0  # requests generating or queued; guarded by _admission_lock
        self._admission_lock = threading.Lock()
        self._canary: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "TransformersEngine":
        return cls(settings.engine)

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._load)
        except ImportError as exc:
            self._health = EngineHealth(EngineState.BROKEN, f"the in-process engine needs {exc.name or exc}: "
                                                             "pip install 'ragllm[engine]'")
            raise
        except Exception as exc:
            self._health = EngineHealth(EngineState.BROKEN, f"model failed to load: {exc}")
            raise
        self._health = EngineHealth(EngineState.READY)
        self._canary = asyncio.create_task(self._canary_forever())

    def _load(self) -> None:
        from ragllm.engines.inprocess.loading import load_model_and_tokenizer
        from ragllm.engines.inprocess.scheduler import SchedulerLimits
        from ragllm.engines.inprocess.worker import Worker

        loaded = load_model_and_tokenizer(self.settings)
        self._tokenizer, self._device = loaded.tokenizer, loaded.device
        self._prompt_tokenizer = PromptTokenizer(loaded.tokenizer)
        self.dtype_name = loaded.dtype_name
        self._stop_token_ids = loaded.stop_token_ids
        self._embedding_rows = loaded.model.get_input_embeddings().num_embeddings
        self._canary_token = next(iter(loaded.stop_token_ids), 0)  # any valid id serves
        self._choosable = _choosable_ids(loaded.tokenizer, _logits_width(loaded.model))
        budget_ms = self.settings.grammar_mask_budget_ms
        mask_budget_s = None if budget_ms is None else budget_ms / 1000
        self._grammars = GrammarCompiler(loaded.tokenizer, self._choosable, loaded.stop_token_ids,
                                         cache_bytes=self.settings.grammar_cache_bytes, mask_budget_s=mask_budget_s)
        # A token's own text, for logprobs (decoded once per id, on the engine thread).
        self._token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda token_id: self._tokenizer.decode([token_id], skip_special_tokens=False))
        max_model_len = self.settings.max_model_len or loaded.max_position_embeddings
        runner = self._runner(loaded.model, max_model_len, str(loaded.path))
        limits = SchedulerLimits(
            max_num_seqs=self.settings.max_num_seqs,
            max_batch_size=self.settings.max_batch_size,
            max_num_batched_tokens=self.settings.max_num_batched_tokens,
            chunked_prefill=self.settings.chunked_prefill,
            max_queue_wait_s=self.settings.max_queue_wait_s,
            grammar_mask_budget_s=mask_budget_s,
            grammar_mask_step_share=self.settings.grammar_mask_step_share,
            max_prefill_while_decoding=self.settings.max_prefill_tokens_while_decoding,
        )
        self.worker = Worker(runner, limits, self._deliver_from_engine_thread, on_fatal=self._on_fatal,
                             choosable=self._choosable)
        self._card = ModelCard(
            id=self.settings.public_model_name,
            max_model_len=max_model_len,
            fingerprint=_fingerprint(loaded.path, loaded.dtype_name, loaded.device, self._tokenizer.chat_template),
            sampling_defaults=loaded.sampling_defaults,
            thinking_switch="enable_thinking" in (self._tokenizer.chat_template or ""),
            tool_call_format=format_of_template(self._tokenizer.chat_template)[0],
            no_think_suffix=self.settings.no_think_suffix,
            max_token_bytes=_max_token_bytes(self._tokenizer),
        )
        if self._device.type == "cuda":
            # The engine thread and the event loop hand work back and forth through the GIL; at
            # Python's default 5 ms switch interval each handover can wait that long, which on a GPU
            # (a prefill takes a few ms) doubled the time to first token. 0.5 ms costs nothing there.
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.worker.start()
        logger.info("model %s ready on %s (%s), context %d", self._card.id, loaded.device, loaded.dtype_name, max_model_len)

    def _runner(self, model: Any, max_model_len: int, model_path: str) -> Any:
        from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, ModelRunner, kv_storage_dtype
        from ragllm.checkpoints import resolved_kv_cache_dtype

        kv = KVCacheOptions(block_size=self.settings.block_size, num_blocks=self.settings.num_kv_blocks,
                            memory_bytes=self.settings.kv_cache_memory_bytes,
                            prefix_caching=self.settings.enable_prefix_caching,
                            dtype=kv_storage_dtype(resolved_kv_cache_dtype(self.settings.kv_cache_dtype, model_path)))
        if self._device.type != "cuda":
            return ModelRunner(model, max_model_len, kv)
        from ragllm.engines.inprocess.runner.cuda import CudaGraphRunner, CudaRunnerOptions

        options = CudaRunnerOptions(
            max_batch_size=self.settings.max_batch_size,
            max_num_batched_tokens=self.settings.max_num_batched_tokens,
            gpu_memory_utilization=self.settings.gpu_memory_utilization,
            cuda_graphs=self.settings.cuda_graphs,
        )
        return CudaGraphRunner(model, max_model_len, options, kv)

    async def aclose(self) -> None:
        if self._canary is not None:
            self._canary.cancel()
            await asyncio.gather(self._canary, return_exceptions=True)
        if self.worker is not None:
            # A broken engine's thread may be stuck in a step for good: do not wait for it (it is a
            # daemon thread, gone with the process).
            await asyncio.to_thread(self.worker.stop, 0 if self.health().restart_needed else 30)

    def _on_fatal(self, exc: BaseException) -> None:
        """Engine thread: a step failed for no sequence in particular (a device error)."""
        self._health = EngineHealth(EngineState.BROKEN, f"engine failed: {type(exc).__name__}: {exc}",
                                    restart_needed=True)

    # -- readiness ------------------------------------------------------------------------------
    async def _canary_forever(self) -> None:
        """While idle, prove every ``canary_interval_s`` that the model still produces a token."""
        interval = self.settings.canary_interval_s
        while self._health.state is EngineState.READY:
            await asyncio.sleep(interval / 2)
            idle_for = time.monotonic() - self.worker.last_progress
            if self._admitted == 0 and idle_for >= interval:
                await self._run_canary()

    async def _run_canary(self) -> None:
        request = GenerationRequest("canary-" + os.urandom(6).hex(), SamplingParams(max_tokens=1, temperature=0.0),
                                    prompt_token_ids=[self._canary_token])
        sequence = self._new_sequence(request, [self._canary_token])
        sequence.for_client = False
        self.worker.submit(sequence)
        try:
            answer = await asyncio.wait_for(sequence.sink.get(), self.settings.stall_timeout_s)
        except asyncio.TimeoutError:
            self.worker.abort(request.request_id)
            answer = TimeoutError(f"no token within {self.settings.stall_timeout_s:g} s")
        if isinstance(answer, BaseException) and self._health.state is EngineState.READY:
            self._health = EngineHealth(EngineState.BROKEN, f"the canary generation failed: {answer}",
                                        restart_needed=True)

    @property
    def device_name(self) -> str:
        return str(self._device)

    # -- the seam -------------------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        return [self._card] if self._card else []

    def health(self) -> EngineHealth:
        if self._health.state is EngineState.READY:
            broken = self._broken_now()
            if broken is not None:  # latched: an engine found broken is not trusted again
                self._health = broken
        return self._health

    def _broken_now(self) -> EngineHealth | None:
        if not self.worker.is_alive():
            return EngineHealth(EngineState.BROKEN, "engine thread has stopped", restart_needed=True)
        stalled_for = time.monotonic() - self.worker.last_progress
        if self._admitted and stalled_for > self.settings.stall_timeout_s:
            return EngineHealth(EngineState.BROKEN, f"the engine has completed no step for {stalled_for:.0f} s "
                                                    f"with {self._admitted} requests admitted", restart_needed=True)
        return None

    def stats(self) -> EngineStats:
        if self.worker is None:
            return EngineStats()
        running = self.worker.scheduler.num_running
        blocks = self.worker.scheduler.blocks  # plain counters read off the engine thread: a moment's view
        kv = KVCacheStats(block_size=blocks.block_size, blocks_total=blocks.pool.num_usable,
                          blocks_free=blocks.pool.num_free, prefix_cache_queries=blocks.pool.queries,
                          prefix_cache_hits=blocks.pool.hits, num_preemptions=blocks.num_preemptions,
                          dtype=str(self.worker.runner.cache_dtype).removeprefix("torch."))
        produced = Usage(self.worker.num_prompt_tokens_started, self.worker.num_tokens_sampled)
        return EngineStats(num_running=running, num_waiting=max(0, self._admitted - running), kv_cache=kv,
                           produced=produced)

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        health = self.health()
        if health.state is not EngineState.READY:
            raise EngineNotReady(health.detail or "engine is not ready")
        choices = request.params.n
        if choices > self.settings.max_num_seqs:
            raise InvalidRequest(f"n={choices} needs {choices} engine slots at once; this engine has "
                                 f"max_num_seqs={self.settings.max_num_seqs}", param="n")
        self._reserve_admission()
        try:
            prompt_ids, grammars, block_hashes = await asyncio.to_thread(self._prompt_and_grammars, request)
            sink: asyncio.Queue = asyncio.Queue()
            sequences = [self._new_sequence(request, prompt_ids, index, sink) for index in range(choices)]
        except BaseException:
            self._release_admission()
            raise
        leader = sequences[0]
        leader.block_hashes = block_hashes
        for sequence, grammar in zip(sequences, grammars):
            sequence.grammar = grammar
            if sequence is not leader:
                sequence.leader = leader
                leader.followers.append(sequence)
        stream = _QueueStream(self, sequences)
        self.worker.submit(leader)
        return stream

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(await asyncio.to_thread(self._prompt_ids, request))

    # -- admission ------------------------------------------------------------------------------
    def _reserve_admission(self) -> None:
        capacity = self.settings.max_num_seqs + self.settings.max_waiting
        with self._admission_lock:
            if self._admitted >= capacity:
                raise EngineOverloaded(
                    f"the engine is at capacity ({self.settings.max_num_seqs} running, "
                    f"{self.settings.max_waiting} waiting); retry shortly"
                )
            self._admitted += 1

    def _release_admission(self) -> None:
        with self._admission_lock:
            self._admitted -= 1

    def _prompt_and_grammars(self, request: GenerationRequest) -> tuple[list[int], list[Any], list[bytes]]:
        """Off the event loop in one hop: the prompt's ids, each choice's position in the structured
        output's grammar (None each where there is none), and the prompt's block hashes for the
        prefix cache (hashed here rather than on the engine thread, which every stream waits on)."""
        prompt_ids = self._prompt_ids(request)
        structured = request.params.structured
        grammars = [None] * request.params.n if structured is None else \
            [self._grammars.grammar(structured) for _ in range(request.params.n)]
        return prompt_ids, grammars, self.worker.scheduler.blocks.prompt_hashes(prompt_ids, request.cache_scope.digest())

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        from ragllm.engines.inprocess.loading import prompt_token_ids

        ids = prompt_token_ids(self._tokenizer, request, self._prompt_tokenizer)
        # A tokenizer with tokens the model has no embedding for would crash the device (CUDA asserts
        # on an out-of-range index and the context is lost): refuse the request instead.
        if max(ids) >= self._embedding_rows:
            raise EngineFailure(f"the tokenizer produced token id {max(ids)}, but the model embeds only "
                                f"{self._embedding_rows} tokens: the tokenizer does not match the model")
        return ids

    def _new_sequence(self, request: GenerationRequest, prompt_ids: list[int], index: int = 0,
                      sink: asyncio.Queue | None = None) -> Sequence:
        """Choice ``index`` of the request; with a seed it samples with seed + index, as vLLM's do."""
        import torch

        max_tokens = self._max_tokens(len(prompt_ids), request.params.max_tokens)
        generator = None
        if request.params.seed is not None and not request.params.greedy:
            generator = torch.Generator(device=self._device).manual_seed((request.params.seed + index) % 2**64)
        return Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            params=request.params,
            max_tokens=max_tokens,
            stop_token_ids=frozenset() if request.params.ignore_eos else self._stop_token_ids,
            detokenizer=IncrementalDetokenizer(self._tokenizer, prompt_ids),
            stop_matcher=StopMatcher(request.params.stop),
            sink=sink if sink is not None else asyncio.Queue(),
            generator=generator,
            token_text=self._token_text if request.params.logprobs is not None else None,
            index=index,
            scope_salt=request.cache_scope.digest(),
        )

    def _max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        window = self._card.max_model_len
        room = window - num_prompt_tokens
        if requested is None:
            requested_default = self.settings.default_max_tokens
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

    # -- engine thread → event loop ---------------------------------------------------------------
    def _deliver_from_engine_thread(self, results: list[tuple[Sequence, Delta | BaseException]]) -> None:
        self._loop.call_soon_threadsafe(_dispatch, results)

    def _abort(self, request_id: str) -> asyncio.Future[None]:
        """Remove the request from the engine; the future is done once the engine thread has removed
        it, after which nothing more is sampled for it."""
        removed = self._loop.create_future()

        def acknowledge() -> None:  # on the engine thread
            try:
                self._loop.call_soon_threadsafe(_resolve, removed)
            except RuntimeError:  # the event loop has closed: nobody waits any more
                pass

        self.worker.abort(request_id, acknowledge)
        return removed

    def _is_running(self) -> bool:
        return self.worker is not None and self.worker.is_alive()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _dispatch(results: list[tuple[Sequence, Delta | BaseException]]) -> None:
    for sequence, item in results:
        sequence.sink.put_nowait(item)


def _logits_width(model: Any) -> int:
    """Columns of the model's logits (the vocabulary it was trained with, often past the tokenizer's)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _choosable_ids(tokenizer: Any, logits_width: int) -> int:
    """Columns of the logits a token is chosen from: up to the tokenizer's highest id, within the
    model's logits."""
    return min(logits_width, max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1))


def _max_token_bytes(tokenizer: Any) -> int:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(len(tokenizer.convert_tokens_to_string([token]).encode()) for token in tokens if token is not None)


def _fingerprint(path: Any, dtype_name: str, device: Any, chat_template: str) -> str:
    """Identifies what shapes outputs: weights, numerics, template and engine version."""
    identity = f"{path}:{dtype_name}:{device}:{__version__}:{chat_template}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]


class _QueueStream(DeltaStream):
    """The deltas of a request's choices, as its sequences produce them; done when every choice has
    finished. A failure of any choice fails the request (closing it frees the other choices)."""

    def __init__(self, engine: TransformersEngine, sequences: list[Sequence]) -> None:
        self.request_id = sequences[0].request_id
        self._engine = engine
        # Every choice, kept here: the scheduler empties the leader's followers once they start.
        self._choices = tuple(sequences)
        self._queue: asyncio.Queue = sequences[0].sink
        self._unfinished = len(sequences)
        self._done = False
        self._removed: asyncio.Future[None] | None = None  # the engine's word that the abort is done

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while not self._done:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._finish()
                if self._unfinished > 1:  # the other choices would run on for nobody
                    self._removed = self._engine._abort(self.request_id)
                if isinstance(item, RagLLMError):  # the engine's own verdict on this request
                    raise item
                raise EngineFailure(f"generation failed: {item}") from item
            if item.finish_reason is not None:
                self._unfinished -= 1
                if not self._unfinished:
                    self._finish()
            yield item

    async def aclose(self) -> None:
        if not self._done:
            self._finish()
            self._removed = self._engine._abort(self.request_id)

    async def settled(self) -> None:
        """Once an abort is in, the engine thread may still be running the step it started (a long
        prefill can take many seconds): wait for its word that the request is out, so ``produced()``
        counts that step's tokens too. Bounded by the engine's stall timeout, and over at once if the
        engine thread has stopped."""
        if self._removed is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._engine.settings.stall_timeout_s
        while not self._removed.done() and self._engine._is_running():
            if loop.time() >= deadline:
                logger.warning("request %s: the engine did not confirm its abort within %g s; billing what "
                               "it had produced by then", self.request_id, self._engine.settings.stall_timeout_s)
                return
            await asyncio.wait({self._removed}, timeout=ABORT_POLL_S)

    def produced(self) -> Usage:
        """Read off the sequences (the engine thread appends to them): the prompt once the leader was
        scheduled, every choice's sampled tokens, queued for the consumer or not."""
        leader = self._choices[0]
        prompt = leader.num_prompt_tokens if leader.queue_time_s is not None else 0
        return Usage(prompt, sum(len(s.output_ids) for s in self._choices))

    def _finish(self) -> None:
        self._done = True
        self._engine._release_admission()
