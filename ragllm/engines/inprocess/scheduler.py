"""The continuous-batching loop of the in-process engine, run on its own thread.

Each step decodes one token for every decoding sequence (in micro-batches of at most
``max_batch_size`` rows), then prefills waiting prompts within the step's token budget. Requests join
at the next step and leave as soon as they finish or are aborted; nothing holds a lock across a
request's generation.

KV memory: each running sequence holds the blocks its block table names (``block_tables``), the
blocks of its longest cached prefix shared with other sequences. A request is admitted when a row is
free (``max_num_seqs``) and the blocks its prompt needs beyond that prefix are free; decoding takes
one more block every ``block_size`` tokens. When none is free, the newest running sequence is
preempted, as vLLM does: its blocks are freed and it waits at the head of the queue, to be computed
again (its prompt and answer so far) when blocks free up; its client waits but loses nothing.

Faults: one that belongs to a sequence (its sampling, detokenizing, stop matching) ends that sequence
alone with an error of its own; the rest of the batch is chosen again row by row and goes on exactly
as it would have. One that belongs to no sequence (a forward pass failing: a device error) fails every
request with a 503 and reports the engine broken through ``on_fatal``: after a device error the
engine's state cannot be trusted, so it is not stepped again.

Admission is first come, first served. While answers decode, a step's prefill is capped
(``prefill_policy``: half the step's budget unless set), so a long prompt is prefilled in chunks
between decode steps (whatever ``chunked_prefill`` says): it waits neither for running answers to
finish nor they for its whole prefill. One that has not started within ``max_queue_wait_s`` gets a 503.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ragllm.engines.inprocess.sample.logprobs import scores_on_device, scores_on_host
from ragllm.engines.inprocess.kv.block_tables import BlockTables
from ragllm.engines.inprocess.kv.blocks import BlockPool
from ragllm.engines.inprocess.runner.cpu import ModelRunner, PrefillChunk
from ragllm.engines.inprocess.prefill_policy import PrefillPolicy
from ragllm.engines.inprocess.readback import TokenReadback
from ragllm.engines.inprocess.sample.choice import sample_next_tokens, sample_on_device, sample_row_by_row, samplable_on_device
from ragllm.engines.inprocess.sequence import Sequence, SequenceStatus
from ragllm.generation import Delta
from ragllm.errors import ContextLengthExceeded, EngineFailure, EngineNotReady, EngineOverloaded
from ragllm.structured.grammars import GrammarViolation
from ragllm.engines.inprocess.sample.masks import TokenMasks

logger = logging.getLogger(__name__)

# Hands a step's results to the event loop in one go: [(sequence, delta or exception), ...].
Deliver = Callable[[list[tuple[Sequence, "Delta | BaseException"]]], None]


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_batch_size: int
    max_num_batched_tokens: int
    chunked_prefill: bool
    max_queue_wait_s: float | None = None  # None: a request may wait for its prefill indefinitely
    grammar_mask_budget_s: float | None = None  # one row's token mask a step; over it the row ends alone
    grammar_mask_step_share: float | None = None  # of a step's other work, what one row's masks may add
    max_prefill_while_decoding: int | None = None  # prefill tokens a step while rows decode; None: half


class _Abort:
    __slots__ = ("request_id", "on_removed")

    def __init__(self, request_id: str, on_removed: Callable[[], None] | None) -> None:
        self.request_id = request_id
        self.on_removed = on_removed  # called on the engine thread once no step can add to it


_SHUTDOWN = object()


def _acknowledge(abort: _Abort) -> None:
    if abort.on_removed is None:
        return
    try:
        abort.on_removed()
    except Exception:  # the caller's callback: its failure is no reason to stop the engine
        logger.warning("acknowledging the abort of %s failed", abort.request_id, exc_info=True)


@dataclass
class _LaunchedStep:
    batch: list[Sequence]  # the decoding sequences, in slot order, it was launched for
    logits: "torch.Tensor"


class Scheduler:
    def __init__(self, runner: ModelRunner, limits: SchedulerLimits, deliver: Deliver,
                 launch_ahead: bool | None = None,
                 on_fatal: Callable[[BaseException], None] = lambda exc: None,
                 choosable: int | None = None) -> None:
        self.runner = runner
        # Tokens are chosen among the first ``choosable`` columns of the logits: the ids the tokenizer
        # can write. Models pad their vocabulary past it (Qwen2.5: 151,936 columns for 151,665 ids);
        # a padded id is no text and no token a grammar knows, so it is never a choice.
        self.choosable = choosable
        self.limits = limits
        self.prefill_policy = PrefillPolicy(limits.max_num_batched_tokens, limits.chunked_prefill,
                                            limits.max_prefill_while_decoding)
        self._deliver = deliver
        self._on_fatal = on_fatal
        self.fatal: BaseException | None = None  # set once a step failed for no sequence in particular
        self.last_progress = time.monotonic()  # when a step last completed (or the loop last idled)
        self.num_sequence_faults = 0
        # What the engine produced for clients, counted here as it happens (not from what was billed):
        # the prompt of each request once its prefill starts, and every token sampled for any choice.
        self.num_prompt_tokens_started = 0
        self.num_tokens_sampled = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        pool = BlockPool(runner.cache.num_blocks, runner.block_size, runner.kv_options.prefix_caching)
        self.blocks = BlockTables(pool, runner.kv_salt)
        self.num_steps = 0
        self._ahead: _LaunchedStep | None = None  # a decode step launched before its batch was certain
        self._masks: TokenMasks | None = None  # made when a structured-output request first runs
        self._held: list[tuple[Sequence, Delta | BaseException]] = []  # see _hand_over
        on_gpu = runner.device.type == "cuda"
        self._readback = TokenReadback(limits.max_batch_size, on_gpu)
        # Launching the next step early only pays where it runs asynchronously (a GPU); on the CPU it
        # would compute the step before this one's tokens are delivered. Tests force it on.
        self.launch_ahead = on_gpu if launch_ahead is None else launch_ahead
        self._thread = threading.Thread(target=self._loop, name="ragllm-engine", daemon=True)

    # -- called from the event loop -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, sequence: Sequence) -> None:
        self._inbox.put(sequence)

    def abort(self, request_id: str, on_removed: Callable[[], None] | None = None) -> None:
        """Remove the request; ``on_removed`` is called (on the engine thread) once it is out of every
        queue and no step in flight can sample for it any more, so what it produced is final."""
        self._inbox.put(_Abort(request_id, on_removed))

    def stop(self, timeout_s: float = 30) -> None:
        self._inbox.put(_SHUTDOWN)
        self._thread.join(timeout=timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            idle = not self.running and not self.waiting
            if idle:
                self._hand_over_held()
            try:
                results = self.run_once(block=idle)
            except Exception as exc:  # outside a step: fail everything queued rather than hang it
                logger.exception("engine loop failed")
                results = self._fail_everything(exc)
            if results is None:
                self._hand_over_held()
                break
            self._hand_over(results)
        self._acknowledge_late_aborts()

    def _acknowledge_late_aborts(self) -> None:
        """Aborts that arrived behind the shutdown: nothing runs any more, so each is done."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Abort):
                _acknowledge(item)

    def _hand_over(self, results: list[tuple[Sequence, Delta | BaseException]]) -> None:
        """Give a step's results to the consumers, or hold them for the next step's wait on the device.

        Handing deltas over wakes the event loop, which then takes the GIL for a while (measured on an
        H100: 0.25-0.45 ms of its CPU per step at 32 streams); woken right after a step it competes
        with the next step's masks and launches, on the path the device waits on. So while a step is
        already running ahead, a step's ordinary deltas (not a request's first, not a last, no error)
        are held and handed over once the next step is launched, just before the engine thread waits
        for its tokens: the event loop runs while the engine thread would idle, and each delta arrives
        about a step later. Everything else goes at once, after anything held."""
        if self._ahead is not None and all(_holdable(item) for _, item in results):
            self._held += results
            return
        self._hand_over_held(results)

    def _hand_over_held(self, results: list[tuple[Sequence, Delta | BaseException]] | None = None) -> None:
        held, self._held = self._held, []
        if results:
            held += results
        if held:
            self._deliver(held)

    def run_once(self, block: bool = False) -> list[tuple[Sequence, Delta | BaseException]] | None:
        """Take in submitted work, admit, and run one step; None once shut down."""
        if not self._drain_inbox(block=block):
            return None
        results: list[tuple[Sequence, Delta | BaseException]] = []
        if self.fatal is not None:  # broken: nothing runs again; whatever arrives is refused
            return self._fail_everything(self.fatal)
        self._expire_overdue(results)
        self._admit(results)
        if self.running:
            try:
                self.step(results)
            except Exception as exc:  # a failure of no sequence in particular: the device
                logger.exception("engine step failed; the engine is out of service")
                return results + self._fail_everything(exc)
        self.last_progress = time.monotonic()
        return results

    def _fail_everything(self, exc: BaseException) -> list[tuple[Sequence, BaseException]]:
        first = self.fatal is None
        self.fatal = exc
        if first:
            self._on_fatal(exc)
        refusal = EngineNotReady(f"the engine failed ({type(exc).__name__}: {exc}) and is out of service "
                                 "until the server restarts; retry on another replica or shortly")
        return self._fail_running(refusal) + self._fail_waiting(refusal)

    def _drain_inbox(self, block: bool) -> bool:
        """Move submitted work into the queues; returns False on shutdown."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is _SHUTDOWN:
                return False
            if isinstance(item, _Abort):
                self._abort(item.request_id)
                _acknowledge(item)
            else:
                self.waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _abort(self, request_id: str) -> None:
        """Remove the request: every choice of it (a waiting leader holds its followers)."""
        for sequence in [s for s in (*self.waiting, *self.running) if s.request_id == request_id]:
            self._remove(sequence)

    def _expire_overdue(self, results: list) -> None:
        """Requests whose prefill has not started within ``max_queue_wait_s`` are refused (503)."""
        limit = self.limits.max_queue_wait_s
        if limit is None:
            return
        deadline = time.monotonic() - limit
        overdue = []
        for sequence in self.waiting:  # in arrival order, after any preempted ones
            if sequence.queue_time_s is not None:
                continue  # preempted: it waits again, but it has started, so it is not refused
            if sequence.arrival_time >= deadline:
                break
            overdue.append(sequence)
        overdue += [s for s in self.running if s.queue_time_s is None and s.arrival_time < deadline]
        for sequence in overdue:
            refusal = EngineOverloaded(f"the request waited {limit:g} s for the engine without starting; "
                                       "retry shortly or on another replica")
            self._remove(sequence)
            results.append((sequence, refusal))

    def _remove(self, sequence: Sequence) -> None:
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        elif sequence in self.running:
            self._release(sequence)

    def _admit(self, results: list) -> None:
        """Waiting requests join in arrival order while rows and KV blocks are free; a request of
        several choices takes a row each, its followers right behind its leader. A prompt that
        starts like an earlier one (same RAG template and documents) starts past its cached blocks."""
        while self.waiting:
            sequence = self.waiting[0]
            group = [sequence, *sequence.followers]
            if len(self.running) + len(group) > self.limits.max_num_seqs:
                break
            alone = not self.running
            if not self.blocks.admit(group, alone=alone):
                if alone:  # it would never fit: the pool is smaller than the request
                    self.waiting.popleft()
                    results.append((sequence, self._too_large(group)))
                    continue
                break
            self.waiting.popleft()
            for member in group:
                member.status = SequenceStatus.PREFILLING
                self.running.append(member)

    def _too_large(self, group: list[Sequence]) -> ContextLengthExceeded:
        pool = self.blocks.pool
        return ContextLengthExceeded(
            f"this request needs more KV cache than the engine has ({len(group)} choices of "
            f"{group[0].num_prompt_tokens} prompt tokens; {pool.num_usable} blocks of {pool.block_size} "
            "tokens); lower n or the prompt", param="n" if len(group) > 1 else "messages")

    def _preempt_newest(self) -> None:
        """Free the blocks of the newest running sequence (with its choices not yet started) and put it
        back at the head of the queue, to be computed again when blocks free up."""
        victim = self.running[-1]
        victim = victim.leader if victim.leader is not None else victim
        for member in (victim, *victim.followers):
            self.running.remove(member)
            self.blocks.preempt(member)
            member.status = SequenceStatus.WAITING
        self.waiting.appendleft(victim)
        self._ahead = None
        logger.info("request %s preempted: no free KV block (%d running)", victim.request_id, len(self.running))

    def _room_to_decode(self, decoding: list[Sequence]) -> list[Sequence]:
        """A block for every decoding sequence's next position, oldest first, preempting the newest
        running sequences while none is free; returns the sequences still decoding."""
        for sequence in decoding:
            while sequence.status is SequenceStatus.DECODING and not self.blocks.grow(sequence, sequence.next_position):
                self._preempt_newest()
        return [s for s in decoding if s.status is SequenceStatus.DECODING]

    def step(self, results: list[tuple[Sequence, Delta | BaseException]]) -> None:
        """One scheduling step: decode every decoding sequence once, then prefill within budget."""
        self.num_steps += 1
        num_decoding = self._decode_all(results)
        self._prefill_within_budget(num_decoding, results)
        self._release_finished()

    def _decode_all(self, results: list) -> int:
        decoding = self._room_to_decode([s for s in self.running if s.status is SequenceStatus.DECODING])
        batch_size = self.limits.max_batch_size
        if decoding and len(decoding) <= batch_size and samplable_on_device(
                [s.params for s in decoding], [s.generator for s in decoding]):
            self._decode_pipelined(decoding, results)
            return len(decoding)
        self._ahead = None
        for first in range(0, len(decoding), batch_size):
            batch = decoding[first : first + batch_size]
            logits = self.runner.decode([s.block_table for s in batch], [s.output_ids[-1] for s in batch],
                                        [s.next_position for s in batch])
            self._sample_and_record(batch, logits, results)
        self._register_decoded(decoding)
        return len(decoding)

    def _register_decoded(self, decoding: list[Sequence]) -> None:
        """Register the blocks this step filled: a sequence fills one when its next position starts a
        block (positions advance one a step, so no boundary is skipped)."""
        if not self.blocks.pool.prefix_caching:
            return
        block_size = self.blocks.block_size
        for sequence in decoding:
            if sequence.next_position % block_size == 0 and sequence.status is SequenceStatus.DECODING:
                self.blocks.register_full(sequence, sequence.next_position)

    def _decode_pipelined(self, decoding: list[Sequence], results: list) -> None:
        """One decode step whose tokens are chosen on the device; when the batch can only stay as it
        is (nothing waits to join), the next step is launched before this one's tokens are read back,
        so the host's per-token work (detokenizing, stop strings, handing deltas over) overlaps the
        device's next step instead of leaving it idle. A launched step whose batch then changes (a
        sequence finished, was aborted or joined) is dropped: its cache writes lie at positions the
        real step rewrites before anything reads them."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.batch == decoding:
            logits = ahead.logits
        else:
            logits = self.runner.decode([s.block_table for s in decoding], [s.output_ids[-1] for s in decoding],
                                        [s.next_position for s in decoding])
        logits = self._choosable(logits)
        masked, failures = self._constrain(decoding, logits)
        try:
            tokens = sample_on_device(masked, [s.params for s in decoding])
        except Exception:
            logger.warning("batched sampling failed; choosing row by row", exc_info=True)
            tokens = _with_failures(_choose_row_by_row(decoding, masked), failures)
            self._record(decoding, tokens, results, self._scores(decoding, tokens, logits))
            self._register_decoded(decoding)
            return
        # Scored before any step is launched ahead (its replay rewrites the logits buffer), and a
        # step with scores to read back is not launched ahead.
        scores = scores_on_device(decoding, tokens, logits)
        host_tokens = self._readback.start(tokens)
        if self.launch_ahead and scores is None and not self.waiting \
                and all(s.status is SequenceStatus.DECODING for s in self.running) \
                and all(self.blocks.grow(s, s.next_position + 1) for s in decoding):
            next_logits = self.runner.decode([s.block_table for s in decoding], tokens,
                                             [s.next_position + 1 for s in decoding])
            self._ahead = _LaunchedStep(decoding, next_logits)
        self._hand_over_held()  # the consumers' turn while this step's tokens are computed
        self._record(decoding, _with_failures(host_tokens.finish(), failures), results,
                     scores_on_host(decoding, scores))
        self._register_decoded(decoding)

    def _prefill_within_budget(self, num_decoding: int, results: list) -> None:
        policy = self.prefill_policy
        budget = policy.budget(num_decoding)
        chunks: list[tuple[Sequence, list[int], int]] = []  # (sequence, what it prefills, tokens now)
        for sequence in self.running:
            if sequence.status is not SequenceStatus.PREFILLING or sequence.leader is not None:
                continue  # a follower's prompt is its leader's: it starts when the leader's is done
            target = sequence.prefill_ids()
            chunk = policy.chunk(len(target) - sequence.num_computed, budget, head=not chunks,
                                 decoding=num_decoding > 0)
            if chunk <= 0:
                break  # first come, first served: no later prompt overtakes this one
            budget -= chunk
            chunks.append((sequence, target, chunk))
        if not chunks:
            return
        items = []
        for sequence, target, chunk in chunks:
            for member in (sequence, *sequence.followers):
                if member.mark_scheduled() and member is sequence and sequence.for_client:
                    self.num_prompt_tokens_started += sequence.num_prompt_tokens  # once a request
            start = sequence.num_computed
            items.append(PrefillChunk(sequence.block_table, target[start : start + chunk], start))
        all_logits = self.runner.prefill_many(items)
        for (sequence, target, chunk), logits in zip(chunks, all_logits):
            sequence.num_computed += chunk
            self.blocks.register_full(sequence, sequence.num_computed)
            if sequence.num_computed == len(target):
                sequence.status = SequenceStatus.DECODING
                group = [sequence, *self._start_followers(sequence)]
                # Every choice draws its first token from the same last-position logits.
                self._sample_and_record(group, logits[None].repeat(len(group), 1), results)

    def _start_followers(self, leader: Sequence) -> list[Sequence]:
        """The leader's other choices, decoding from its prompt's blocks (the partial last one
        copied); from now on each is a sequence of its own (preempted and recomputed alone)."""
        followers, leader.followers = leader.followers, []
        for follower in followers:
            self.blocks.fork(leader, follower, self.runner.copy_block)
            follower.num_computed = follower.num_prompt_tokens
            follower.status = SequenceStatus.DECODING
            follower.leader = None
        return followers

    def _sample_and_record(self, batch: list[Sequence], logits, results: list) -> None:
        logits = self._choosable(logits)
        masked, failures = self._constrain(batch, logits)
        tokens = _with_failures(_choose(batch, masked), failures)
        self._record(batch, tokens, results, self._scores(batch, tokens, logits))

    def _choosable(self, logits: "torch.Tensor") -> "torch.Tensor":
        """The logits' columns of ids the tokenizer can write, cut once where a step's logits come in:
        what tokens are chosen from and log probabilities are normalised over (a padded id is no
        candidate, as in vLLM's logits)."""
        if self.choosable is not None and logits.shape[-1] > self.choosable:
            return logits[:, : self.choosable]  # a view: no copy, no launch
        return logits

    def _constrain(self, batch: list[Sequence], logits) -> tuple["torch.Tensor", list | None]:
        """The logits to choose from (structured-output rows masked to what their grammar allows) and
        the rows whose grammar failed (None when no row follows one: the common case costs nothing)."""
        if all(s.grammar is None for s in batch):
            return logits, None
        if self._masks is None:
            self._masks = TokenMasks(logits.shape[-1], logits.device, budget_s=self.limits.grammar_mask_budget_s,
                                     step_share=self.limits.grammar_mask_step_share)
        try:
            return self._masks.apply(logits, [s.grammar for s in batch])
        except Exception as exc:  # the masks themselves failed: the constrained rows end, the rest go on
            logger.warning("computing token masks failed", exc_info=True)
            return logits, [exc if s.grammar is not None else None for s in batch]

    @staticmethod
    def _scores(batch: list[Sequence], tokens: list, logits) -> list:
        try:
            return scores_on_host(batch, scores_on_device(batch, tokens, logits))
        except Exception:  # scoring failed: the rows that asked for it fail alone, in _record
            logger.warning("scoring logprobs failed", exc_info=True)
            return [RuntimeError("computing logprobs failed") if s.params.logprobs is not None else None
                    for s in batch]

    def _record(self, batch: list[Sequence], tokens: list, results: list, scores: list | None = None) -> None:
        for sequence, token, token_scores in zip(batch, tokens, scores or [None] * len(batch)):
            try:
                for outcome in (token, token_scores):
                    if isinstance(outcome, BaseException):
                        raise outcome
                if sequence.for_client:
                    self.num_tokens_sampled += 1  # append_token keeps it, whatever it raises after
                delta = sequence.append_token(token, token_scores)
            except Exception as exc:
                self._fail_sequence(sequence, exc, results)
                continue
            if delta is not None:
                results.append((sequence, delta))

    def _fail_sequence(self, sequence: Sequence, exc: Exception, results: list) -> None:
        """End one sequence with an error of its own; its slot is released at the end of the step.
        A grammar that dead-ends is the request's constraint at fault, told as such (a 400)."""
        self.num_sequence_faults += 1
        sequence.status = SequenceStatus.FINISHED
        if isinstance(exc, GrammarViolation) and sequence.grammar is not None:
            error = sequence.grammar.unfollowable(exc)
            logger.warning("request %s: %s", sequence.request_id, error.message)
            results.append((sequence, error))
            return
        logger.error("request %s failed alone: %s: %s", sequence.request_id, type(exc).__name__, exc)
        results.append((sequence, EngineFailure(f"generating this answer failed ({type(exc).__name__}: {exc}); "
                                                "other requests were not affected")))

    def _release_finished(self) -> None:
        for sequence in [s for s in self.running if s.status is SequenceStatus.FINISHED]:
            self._release(sequence)

    def _release(self, sequence: Sequence) -> None:
        """The sequence leaves: its blocks are freed this step (those registered stay cached)."""
        sequence.status = SequenceStatus.FINISHED
        self.blocks.free(sequence)
        self.running.remove(sequence)

    def _fail_waiting(self, exc: BaseException) -> list[tuple[Sequence, BaseException]]:
        failed, self.waiting = [(sequence, exc) for sequence in self.waiting], deque()
        return failed

    def _fail_running(self, exc: BaseException) -> list[tuple[Sequence, BaseException]]:
        self._ahead = None
        failed = [(sequence, exc) for sequence in self.running]
        for sequence in self.running:
            sequence.status = SequenceStatus.FINISHED
            self.blocks.free(sequence)
        self.running.clear()
        return failed


def _holdable(item: Delta | BaseException) -> bool:
    """A delta that may wait a step: neither a request's first (its time to first token: the one
    that carries every token so far) nor its last, nor an error."""
    return isinstance(item, Delta) and item.finish_reason is None and item.num_tokens < item.completion_tokens


def _choose(batch: list[Sequence], logits) -> list:
    """One token a row, chosen together; if that fails, each row alone (a fault then ends only its own
    row), seeded rows from their generator state before the failed attempt."""
    generators = [s.generator for s in batch]
    saved = [g.get_state() if g is not None else None for g in generators]
    try:
        return sample_next_tokens(logits, [s.params for s in batch], _histories(batch), generators)
    except Exception:
        logger.warning("batched sampling failed; choosing row by row", exc_info=True)
        for generator, state in zip(generators, saved):
            if generator is not None:
                generator.set_state(state)
        return _choose_row_by_row(batch, logits)


def _with_failures(tokens: list, failures: list | None) -> list:
    """Rows whose grammar failed hold their error instead of a token (and end alone)."""
    if failures is None:
        return tokens
    return [failure if failure is not None else token for token, failure in zip(tokens, failures)]


def _choose_row_by_row(batch: list[Sequence], logits) -> list:
    return sample_row_by_row(logits, [s.params for s in batch], _histories(batch), [s.generator for s in batch])


def _histories(batch: list[Sequence]) -> list[list[int]]:
    """What a repetition penalty needs; empty for rows without one."""
    return [s.history() if s.params.repetition_penalty != 1.0 else [] for s in batch]
