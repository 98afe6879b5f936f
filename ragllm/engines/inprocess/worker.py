"""The in-process engine's thread: it takes in requests and aborts, runs each step the scheduler
plans on the model, samples, and hands the results to the event loop.

A step is three calls, as in nano-vllm's engine: ``scheduler.schedule()`` plans it, the worker runs it
(the decode in batches of at most ``max_batch_size`` rows, sampled by the ``Sampler``, then the prefill
chunks), and ``scheduler.update(plan)`` moves the sequences on. Requests join at the next step and
leave as soon as they finish or are aborted; nothing holds a lock across a request's generation.

On a GPU the worker launches the next decode step before this one's tokens are read back whenever
the batch can only stay as it is, so the host's per-token work overlaps the device's next step.

Faults: one that belongs to a sequence (its sampling, detokenizing, stop matching) ends that sequence
alone with an error of its own (``sampler``). One that belongs to no sequence (a forward pass
failing: a device error) fails every request with a 503 and reports the engine broken through
``on_fatal``: after a device error the engine's state cannot be trusted, so it is not stepped again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ragllm.engines.inprocess.kv.block_tables import BlockTables
from ragllm.engines.inprocess.kv.blocks import BlockPool
from ragllm.engines.inprocess.readback import TokenReadback
from ragllm.engines.inprocess.runner.cpu import ModelRunner, PrefillChunk
from ragllm.engines.inprocess.sample.logprobs import scores_on_device, scores_on_host
from ragllm.engines.inprocess.sample.sampler import Sampler, choose_row_by_row, with_failures
from ragllm.engines.inprocess.scheduler import Scheduler, SchedulerLimits, StepPlan
from ragllm.engines.inprocess.sequence import Sequence, SequenceStatus
from ragllm.errors import EngineFailure, EngineNotReady
from ragllm.generation import Delta
from ragllm.structured.grammars import GrammarViolation

logger = logging.getLogger(__name__)

# Hands a step's results to the event loop in one go: [(sequence, delta or exception), ...].
Deliver = Callable[[list[tuple[Sequence, "Delta | BaseException"]]], None]
Results = list[tuple[Sequence, "Delta | BaseException"]]


class _Abort:
    __slots__ = ("request_id", "on_removed")

    def __init__(self, request_id: str, on_removed: Callable[[], None] | None) -> None:
        self.request_id = request_id
        self.on_removed = on_removed  # called on the engine thread once no step can add to it


SHUTDOWN = object()  # put in the inbox, it ends the thread


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
    logits: torch.Tensor


class Worker:
    def __init__(
        self,
        runner: ModelRunner,
        limits: SchedulerLimits,
        deliver: Deliver,
        launch_ahead: bool | None = None,
        on_fatal: Callable[[BaseException], None] = lambda exc: None,
        choosable: int | None = None,
    ) -> None:
        self.runner = runner
        self.limits = limits
        pool = BlockPool(
            runner.cache.num_blocks, runner.block_size, runner.kv_options.prefix_caching
        )
        self.scheduler = Scheduler(limits, BlockTables(pool, runner.kv_salt), runner.copy_block)
        self.sampler = Sampler(
            choosable, limits.grammar_mask_budget_s, limits.grammar_mask_step_share
        )
        self.deliver = deliver
        self._on_fatal = on_fatal
        self.fatal: BaseException | None = (
            None  # set once a step failed for no sequence in particular
        )
        self.last_progress = time.monotonic()  # when a step last completed (or the loop last idled)
        self.num_sequence_faults = 0
        # What the engine produced for clients, counted here as it happens (not from what was billed):
        # the prompt of each request once its prefill starts, and every token sampled for any choice.
        self.num_prompt_tokens_started = 0
        self.num_tokens_sampled = 0
        self.num_steps = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ahead: _LaunchedStep | None = (
            None  # a decode step launched before its batch was certain
        )
        self._held: Results = []  # see _hand_over
        on_gpu = runner.device.type == "cuda"
        self.readback = TokenReadback(limits.max_batch_size, on_gpu)
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
        self._inbox.put(SHUTDOWN)
        self._thread.join(timeout=timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            idle = not self.scheduler.running and not self.scheduler.waiting
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

    def _hand_over(self, results: Results) -> None:
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

    def _hand_over_held(self, results: Results | None = None) -> None:
        held, self._held = self._held, []
        if results:
            held += results
        if held:
            self.deliver(held)

    def run_once(self, block: bool = False) -> Results | None:
        """Take in submitted work and run one step; None once shut down."""
        if not self._drain_inbox(block=block):
            return None
        if self.fatal is not None:  # broken: nothing runs again; whatever arrives is refused
            return self._fail_everything(self.fatal)
        plan = self.scheduler.schedule()
        results: Results = list(plan.refused)
        if self.scheduler.running:
            try:
                self.step(plan, results)
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
        refusal = EngineNotReady(
            f"the engine failed ({type(exc).__name__}: {exc}) and is out of service "
            "until the server restarts; retry on another replica or shortly"
        )
        self._ahead = None
        return self.scheduler.fail_all(refusal)

    def _drain_inbox(self, block: bool) -> bool:
        """Move submitted work into the scheduler's queue; returns False on shutdown."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is SHUTDOWN:
                return False
            if isinstance(item, _Abort):
                self.scheduler.abort(item.request_id)
                _acknowledge(item)
            else:
                self.scheduler.add(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def step(self, plan: StepPlan, results: Results) -> None:
        """Run one planned step: decode every decoding sequence once, then the prefill chunks."""
        self.num_steps += 1
        if plan.preempted:
            self._ahead = None  # launched for a batch that no longer holds its blocks
        self._decode(plan.decode, results)
        self.num_prompt_tokens_started += plan.num_prompt_tokens_started
        plain = [c for c in plan.prefill if c.sequence.blend is None]
        all_logits = (
            self.runner.prefill_many(
                [PrefillChunk(c.sequence.block_table, c.token_ids, c.start) for c in plain]
            )
            if plain
            else []
        )
        completed = {id(c.sequence): logits for c, logits in zip(plain, all_logits) if c.completes}
        for chunk in plan.prefill:
            blend = chunk.sequence.blend
            if blend is not None:  # documents reused at any position: one whole chunk
                completed[id(chunk.sequence)] = self.runner.blend(
                    chunk.sequence.block_table, chunk.target, chunk.start, blend
                )
        for group in self.scheduler.update(plan):
            # Every choice draws its first token from the same last-position logits.
            logits = completed[id(group[0])]
            self._sample_and_record(group, logits[None].repeat(len(group), 1), results)
        self.scheduler.finish_step()

    def _decode(self, decoding: list[Sequence], results: Results) -> None:
        batch_size = self.limits.max_batch_size
        if decoding and len(decoding) <= batch_size and self.sampler.on_device(decoding):
            self._decode_pipelined(decoding, results)
            return
        self._ahead = None
        for first in range(0, len(decoding), batch_size):
            batch = decoding[first : first + batch_size]
            logits = self.runner.decode(
                [s.block_table for s in batch],
                [s.output_ids[-1] for s in batch],
                [s.next_position for s in batch],
            )
            self._sample_and_record(batch, logits, results)

    def _decode_pipelined(self, decoding: list[Sequence], results: Results) -> None:
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
            logits = self.runner.decode(
                [s.block_table for s in decoding],
                [s.output_ids[-1] for s in decoding],
                [s.next_position for s in decoding],
            )
        logits = self.sampler.choosable_columns(logits)
        masked, failures = self.sampler.constrain(decoding, logits)
        tokens = self.sampler.choose_on_device(decoding, masked)
        if tokens is None:
            tokens = with_failures(choose_row_by_row(decoding, masked), failures)
            self.record(decoding, tokens, results, self.sampler.scores(decoding, tokens, logits))
            return
        # Scored before any step is launched ahead (its replay rewrites the logits buffer), and a
        # step with scores to read back is not launched ahead.
        scores = scores_on_device(decoding, tokens, logits)
        host_tokens = self.readback.start(tokens)
        if self.launch_ahead and scores is None and self.scheduler.can_run_ahead(decoding):
            next_logits = self.runner.decode(
                [s.block_table for s in decoding], tokens, [s.next_position + 1 for s in decoding]
            )
            self._ahead = _LaunchedStep(decoding, next_logits)
        self._hand_over_held()  # the consumers' turn while this step's tokens are computed
        self.record(
            decoding,
            with_failures(host_tokens.finish(), failures),
            results,
            scores_on_host(decoding, scores),
        )

    def _sample_and_record(
        self, batch: list[Sequence], logits: torch.Tensor, results: Results
    ) -> None:
        tokens, scores = self.sampler.sample(batch, logits)
        self.record(batch, tokens, results, scores)

    def record(
        self, batch: list[Sequence], tokens: list, results: Results, scores: list | None = None
    ) -> None:
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

    def _fail_sequence(self, sequence: Sequence, exc: Exception, results: Results) -> None:
        """End one sequence with an error of its own; its slot is released at the end of the step.
        A grammar that dead-ends is the request's constraint at fault, told as such (a 400)."""
        self.num_sequence_faults += 1
        sequence.status = SequenceStatus.FINISHED
        if isinstance(exc, GrammarViolation) and sequence.grammar is not None:
            error = sequence.grammar.unfollowable(exc)
            logger.warning("request %s: %s", sequence.request_id, error.message)
            results.append((sequence, error))
            return
        logger.error(
            "request %s failed alone: %s: %s", sequence.request_id, type(exc).__name__, exc
        )
        results.append(
            (
                sequence,
                EngineFailure(
                    f"generating this answer failed ({type(exc).__name__}: {exc}); "
                    "other requests were not affected"
                ),
            )
        )


def _holdable(item: Delta | BaseException) -> bool:
    """A delta that may wait a step: neither a request's first (its time to first token: the one
    that carries every token so far) nor its last, nor an error."""
    return (
        isinstance(item, Delta)
        and item.finish_reason is None
        and item.num_tokens < item.completion_tokens
    )
