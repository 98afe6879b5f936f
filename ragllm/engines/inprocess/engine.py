"""The in-process engine: a transformers model on CPU or CUDA with continuous batching.

The event loop only validates, tokenises (``sequence_builder``, on a worker thread) and queues; the
model runs on the engine thread (``worker``), which hands each step's deltas back to the loop in one
call; each request reads its own (``request_stream``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from ragllm.config import EngineSettings, Settings
from ragllm.engines.base import Engine
from ragllm.engines.inprocess.admission import AdmissionCounter
from ragllm.engines.inprocess.canary import Canary
from ragllm.engines.inprocess.model_facts import (
    choosable_ids,
    fingerprint,
    logits_width,
    max_token_bytes,
)
from ragllm.engines.inprocess.request_stream import RequestStream
from ragllm.engines.inprocess.sequence import Sequence
from ragllm.engines.inprocess.sequence_builder import SequenceBuilder
from ragllm.engines.inprocess.vocabulary import Vocabulary
from ragllm.errors import EngineNotReady, InvalidRequest
from ragllm.generation import (
    Delta,
    DeltaStream,
    EngineHealth,
    EngineState,
    EngineStats,
    GenerationRequest,
    KVCacheStats,
    ModelCard,
    TokenizedPrompt,
    Usage,
)
from ragllm.structured.closing import ClosingSettings
from ragllm.structured.grammars import GrammarCompiler
from ragllm.tools.formats import format_of_template

logger = logging.getLogger(__name__)
GIL_SWITCH_INTERVAL_S = 0.0005


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._health = EngineHealth(EngineState.LOADING, "model is loading")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.worker: Any = None  # the engine thread (``worker.Worker``), made once the model loads
        self._tokenizer: Any = None
        self._vocabulary: Vocabulary | None = None
        self._device: Any = None
        self.dtype_name = ""
        self._card: ModelCard | None = None
        self._stop_token_ids: frozenset[int] = frozenset()
        self._embedding_rows = 0
        self.admission = AdmissionCounter(settings.max_num_seqs, settings.max_waiting)
        self._canary: Canary | None = None
        self._canary_task: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TransformersEngine:
        return cls(settings.engine)

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._load)
        except ImportError as exc:
            self._health = EngineHealth(
                EngineState.BROKEN,
                f"the in-process engine needs {exc.name or exc}: pip install 'ragllm[engine]'",
            )
            raise
        except Exception as exc:
            self._health = EngineHealth(EngineState.BROKEN, f"model failed to load: {exc}")
            raise
        self._health = EngineHealth(EngineState.READY)
        self._canary_task = asyncio.create_task(
            self._canary.run_while(
                ready=lambda: self._health.state is EngineState.READY,
                idle=lambda: self.admission.count == 0,
                on_failure=self._mark_broken,
            )
        )

    def _load(self) -> None:
        from ragllm.engines.inprocess.loading import load_model_and_tokenizer
        from ragllm.engines.inprocess.runner.build import build_runner
        from ragllm.engines.inprocess.scheduler import SchedulerLimits
        from ragllm.engines.inprocess.worker import Worker

        loaded = load_model_and_tokenizer(self.settings)
        self._tokenizer, self._device = loaded.tokenizer, loaded.device
        self._vocabulary = Vocabulary(loaded.tokenizer)
        self.dtype_name = loaded.dtype_name
        choosable = choosable_ids(loaded.tokenizer, logits_width(loaded.model))
        budget_ms = self.settings.grammar_mask_budget_ms
        mask_budget_s = None if budget_ms is None else budget_ms / 1000
        grammars = GrammarCompiler(
            loaded.tokenizer,
            choosable,
            loaded.stop_token_ids,
            cache_bytes=self.settings.grammar_cache_bytes,
            mask_budget_s=mask_budget_s,
        )
        max_model_len = self.settings.max_model_len or loaded.max_position_embeddings
        self._sequences = SequenceBuilder(
            loaded.tokenizer,
            loaded.device,
            loaded.model.get_input_embeddings().num_embeddings,
            loaded.stop_token_ids,
            max_model_len,
            grammars,
            self.settings.default_max_tokens,
            default_thinking_budget=self.settings.default_thinking_token_budget,
            closing=closing_settings(self.settings),
        )
        if self._sequences.closing is not None:
            self._sequences.closing_search()  # read the vocabulary now, not at a first request
        runner = build_runner(
            loaded.model, loaded.device, max_model_len, str(loaded.path), self.settings
        )
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
        self.worker = Worker(
            runner,
            limits,
            self._deliver_from_engine_thread,
            on_fatal=self._on_fatal,
            choosable=choosable,
        )
        self._canary = Canary(
            self.worker,
            self._sequences,
            next(iter(loaded.stop_token_ids), 0),
            self.settings.canary_interval_s,
            self.settings.stall_timeout_s,
        )
        self._card = ModelCard(
            id=self.settings.public_model_name,
            max_model_len=max_model_len,
            fingerprint=fingerprint(
                loaded.path, loaded.dtype_name, loaded.device, self._tokenizer.chat_template
            ),
            sampling_defaults=loaded.sampling_defaults,
            thinking_switch="enable_thinking" in (self._tokenizer.chat_template or ""),
            tool_call_format=format_of_template(self._tokenizer.chat_template)[0],
            thinks=self._sequences.thinking_markers is not None,
            no_think_suffix=self.settings.no_think_suffix,
            max_token_bytes=max_token_bytes(self._tokenizer),
        )
        if self._device.type == "cuda":
            # The engine thread and the event loop hand work back and forth through the GIL; at
            # Python's default 5 ms switch interval each handover can wait that long, which on a GPU
            # (a prefill takes a few ms) doubled the time to first token. 0.5 ms costs nothing there.
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.worker.start()
        logger.info(
            "model %s ready on %s (%s), context %d",
            self._card.id,
            loaded.device,
            loaded.dtype_name,
            max_model_len,
        )

    async def aclose(self) -> None:
        if self._canary_task is not None:
            self._canary_task.cancel()
            await asyncio.gather(self._canary_task, return_exceptions=True)
        if self.worker is not None:
            # A broken engine's thread may be stuck in a step for good: do not wait for it (it is a
            # daemon thread, gone with the process).
            await asyncio.to_thread(self.worker.stop, 0 if self.health().restart_needed else 30)

    def _on_fatal(self, exc: BaseException) -> None:
        """Engine thread: a step failed for no sequence in particular (a device error)."""
        self._mark_broken(f"engine failed: {type(exc).__name__}: {exc}")

    def _mark_broken(self, detail: str) -> None:
        self._health = EngineHealth(EngineState.BROKEN, detail, restart_needed=True)

    @property
    def grammars(self) -> GrammarCompiler:
        """The compiler (and cache) of this model's structured-output grammars."""
        return self._sequences.grammars

    @property
    def stall_timeout_s(self) -> float:
        return self.settings.stall_timeout_s

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
            return EngineHealth(
                EngineState.BROKEN, "engine thread has stopped", restart_needed=True
            )
        stalled_for = time.monotonic() - self.worker.last_progress
        if self.admission.count and stalled_for > self.settings.stall_timeout_s:
            return EngineHealth(
                EngineState.BROKEN,
                f"the engine has completed no step for {stalled_for:.0f} s "
                f"with {self.admission.count} requests admitted",
                restart_needed=True,
            )
        return None

    def stats(self) -> EngineStats:
        if self.worker is None:
            return EngineStats()
        running = self.worker.scheduler.num_running
        blocks = (
            self.worker.scheduler.blocks
        )  # plain counters read off the engine thread: a moment's view
        kv = KVCacheStats(
            block_size=blocks.block_size,
            blocks_total=blocks.pool.num_usable,
            blocks_free=blocks.pool.num_free,
            prefix_cache_queries=blocks.pool.queries,
            prefix_cache_hits=blocks.pool.hits,
            num_preemptions=blocks.num_preemptions,
            dtype=str(self.worker.runner.cache_dtype).removeprefix("torch."),
            document_hits=blocks.documents.hits,
            document_misses=blocks.documents.misses,
            document_tokens_reused=blocks.documents.tokens_reused,
            document_tokens_recomputed=blocks.documents.tokens_recomputed,
            document_blocks=blocks.documents.num_blocks,
        )
        produced = Usage(self.worker.num_prompt_tokens_started, self.worker.num_tokens_sampled)
        return EngineStats(
            num_running=running,
            num_waiting=max(0, self.admission.count - running),
            kv_cache=kv,
            produced=produced,
        )

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        health = self.health()
        if health.state is not EngineState.READY:
            raise EngineNotReady(health.detail or "engine is not ready")
        choices = request.params.n
        if choices > self.settings.max_num_seqs:
            raise InvalidRequest(
                f"n={choices} needs {choices} engine slots at once; this engine has "
                f"max_num_seqs={self.settings.max_num_seqs}",
                param="n",
            )
        self.admission.reserve()
        try:
            prompt_ids, grammars, block_hashes, closers, documents = await asyncio.to_thread(
                self._sequences.prompt_and_grammars, request, self.worker.scheduler.blocks
            )
            sink: asyncio.Queue = asyncio.Queue()
            sequences = [
                self._sequences.new_sequence(request, prompt_ids, index, sink)
                for index in range(choices)
            ]
        except BaseException:
            self.release_admission()
            raise
        leader = sequences[0]
        leader.block_hashes = block_hashes
        leader.documents = documents if self.worker.runner.reuses_documents else []
        for sequence, grammar, closer in zip(sequences, grammars, closers):
            sequence.grammar, sequence.closer = grammar, closer
            if sequence is not leader:
                sequence.leader = leader
                leader.followers.append(sequence)
        stream = RequestStream(sequences, self)
        self.worker.submit(leader)
        return stream

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(await asyncio.to_thread(self._sequences.prompt_ids, request))

    async def count_text_tokens(self, texts: list[str]) -> list[int]:
        return await asyncio.to_thread(self._loaded_vocabulary().count, texts)

    async def tokenize(self, request: GenerationRequest, strings: bool = False) -> TokenizedPrompt:
        def prompt() -> TokenizedPrompt:
            ids = self._sequences.prompt_ids(request)
            return TokenizedPrompt(ids, self._loaded_vocabulary().strings(ids) if strings else None)

        return await asyncio.to_thread(prompt)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await asyncio.to_thread(self._loaded_vocabulary().decode, token_ids)

    def _loaded_vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            raise EngineNotReady("model is loading")
        return self._vocabulary

    def release_admission(self) -> None:
        self.admission.release()

    # -- engine thread → event loop ---------------------------------------------------------------
    def _deliver_from_engine_thread(
        self, results: list[tuple[Sequence, Delta | BaseException]]
    ) -> None:
        self._loop.call_soon_threadsafe(_dispatch, results)

    def abort(self, request_id: str) -> asyncio.Future[None]:
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

    def is_running(self) -> bool:
        return self.worker is not None and self.worker.is_alive()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _dispatch(results: list[tuple[Sequence, Delta | BaseException]]) -> None:
    for sequence, item in results:
        sequence.sink.put_nowait(item)


def closing_settings(settings: EngineSettings) -> ClosingSettings | None:
    """How structured answers are closed before their budget ends (None: they are not)."""
    if not settings.grammar_close_early:
        return None
    return ClosingSettings(
        window=settings.grammar_close_window_tokens,
        margin=settings.grammar_close_margin_tokens,
        repeat_tokens=settings.grammar_string_repeat_tokens,
    )
