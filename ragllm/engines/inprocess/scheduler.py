"""What each step of the in-process engine runs: admission, chunked prefill, fairness, queue timeouts
and preemption, on plain data. It never touches a tensor; the worker (``worker``) runs its plans.

A step decodes one token for every decoding sequence, then prefills waiting prompts within the step's
token budget. ``schedule()`` takes the queue to a ``StepPlan``: it refuses what waited too long or can
never fit, admits what fits, makes room for every decoding sequence's next position and picks the
prefill chunks. The worker runs the plan and samples; ``update(plan)`` then moves each sequence on
(prefill progress, full blocks registered for the prefix cache, prompts that are done start decoding
with their other choices) and ``finish_step()`` lets finished sequences go.

KV memory: each running sequence holds the blocks its block table names (``kv.block_tables``), the
blocks of its longest cached prefix shared with other sequences. A request is admitted when a row is
free (``max_num_seqs``) and the blocks its prompt needs beyond that prefix are free; decoding takes
one more block every ``block_size`` tokens. When none is free, the newest running sequence is
preempted, as vLLM does: its blocks are freed and it waits at the head of the queue, to be computed
again (its prompt and answer so far) when blocks free up; its client waits but loses nothing.

Admission is first come, first served. While answers decode, a step's prefill is capped
(``prefill_policy``: half the step's budget unless set), so a long prompt is prefilled in chunks
between decode steps (whatever ``chunked_prefill`` says): it waits neither for running answers to
finish nor they for its whole prefill. One that has not started within ``max_queue_wait_s`` gets a 503.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ragllm.engines.inprocess.kv.block_tables import BlockTables
from ragllm.engines.inprocess.kv.document_store import FILL_CONTEXT_RECOMPUTED, DocumentBlend
from ragllm.engines.inprocess.prefill_policy import PrefillPolicy
from ragllm.engines.inprocess.sequence import Sequence, SequenceStatus
from ragllm.errors import ContextLengthExceeded, EngineOverloaded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_batch_size: int
    max_num_batched_tokens: int
    chunked_prefill: bool
    max_queue_wait_s: float | None = None  # None: a request may wait for its prefill indefinitely
    grammar_mask_budget_s: float | None = (
        None  # one row's token mask a step; over it the row ends alone
    )
    grammar_mask_step_share: float | None = (
        None  # of a step's other work, what one row's masks may add
    )
    max_prefill_while_decoding: int | None = (
        None  # prefill tokens a step while rows decode; None: half
    )


@dataclass
class PrefillChunkPlan:
    """Part of one prompt to compute this step."""

    sequence: Sequence  # a leader (its other choices start from its prompt once it is done)
    target: list[
        int
    ]  # what it prefills: its prompt, or prompt and answer so far after a preemption
    start: int  # the first position computed now (tokens before it are cached or computed)
    num_tokens: int  # how many are computed now

    @property
    def token_ids(self) -> list[int]:
        return self.target[self.start : self.start + self.num_tokens]

    @property
    def completes(self) -> bool:
        return self.start + self.num_tokens == len(self.target)


@dataclass
class StepPlan:
    """The scheduler's hand-off to the worker for one step."""

    # Sequences that decode one token each, in admission order (the worker splits them into batches
    # of at most ``max_batch_size`` rows).
    decode: list[Sequence] = field(default_factory=list)
    # Prompt chunks to compute after the decode, in arrival order, within the step's token budget.
    prefill: list[PrefillChunkPlan] = field(default_factory=list)
    # Requests answered without running: waited past ``max_queue_wait_s`` (503) or larger than the
    # whole KV pool (400). They are out of every queue already.
    refused: list[tuple[Sequence, BaseException]] = field(default_factory=list)
    # Sequences preempted to make room for decoding: a step launched ahead for the old batch is void.
    preempted: list[Sequence] = field(default_factory=list)
    # Prompt tokens of requests whose prefill starts this step (each request counted once).
    num_prompt_tokens_started: int = 0


# The longest prompt (its tokens left to compute) a blend takes, in steps' token budgets: a blend
# computes about a quarter of its tokens, so this keeps one near a step's work.
MAX_BLEND_STEPS = 4


def blend_cost(blend: DocumentBlend, remaining: int) -> int:
    """Tokens a blend computes, roughly, for the step budget: everything but the stored documents
    it reuses, plus a quarter of those (the layers computed whole, the share recomputed), plus the
    documents it computes and stores first (computed twice; a short context again with each)."""
    reused = sum(p.span.length for p in blend.placements if not p.fill)
    filled = sum(
        p.span.length + min(p.span.context, FILL_CONTEXT_RECOMPUTED)
        for p in blend.placements
        if p.fill
    )
    return remaining - reused + reused // 4 + filled


class Scheduler:
    """The queues (``waiting``, ``running``) and the KV blocks they hold; ``copy_block(src, dst)``
    copies a KV block's contents (the only device work a decision needs: a choice forking off its
    leader's partial last block)."""

    def __init__(
        self,
        limits: SchedulerLimits,
        blocks: BlockTables,
        copy_block: Callable[[int, int], None] = lambda src, dst: None,
    ) -> None:
        self.limits = limits
        self.blocks = blocks
        self.prefill_policy = PrefillPolicy(
            limits.max_num_batched_tokens, limits.chunked_prefill, limits.max_prefill_while_decoding
        )
        self._copy_block = copy_block
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def abort(self, request_id: str) -> None:
        """Remove the request: every choice of it (a waiting leader holds its followers)."""
        for sequence in [s for s in (*self.waiting, *self.running) if s.request_id == request_id]:
            self._remove(sequence)

    # -- before the step ------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._expire_overdue(plan)
        self._admit(plan)
        plan.decode = self._room_to_decode(plan)
        plan.prefill = self._prefill_chunks(len(plan.decode))
        for chunk in plan.prefill:
            for member in (chunk.sequence, *chunk.sequence.followers):
                if (
                    member.mark_scheduled()
                    and member is chunk.sequence
                    and chunk.sequence.for_client
                ):
                    plan.num_prompt_tokens_started += (
                        chunk.sequence.num_prompt_tokens
                    )  # once a request
        return plan

    def _expire_overdue(self, plan: StepPlan) -> None:
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
            refusal = EngineOverloaded(
                f"the request waited {limit:g} s for the engine without starting; "
                "retry shortly or on another replica"
            )
            self._remove(sequence)
            plan.refused.append((sequence, refusal))

    def _admit(self, plan: StepPlan) -> None:
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
                    plan.refused.append((sequence, self._too_large(group)))
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
            "tokens); lower n or the prompt",
            param="n" if len(group) > 1 else "messages",
        )

    def _room_to_decode(self, plan: StepPlan) -> list[Sequence]:
        """A block for every decoding sequence's next position, oldest first, preempting the newest
        running sequences while none is free; returns the sequences still decoding."""
        decoding = [s for s in self.running if s.status is SequenceStatus.DECODING]
        for sequence in decoding:
            while sequence.status is SequenceStatus.DECODING and not self.blocks.grow(
                sequence, sequence.next_position
            ):
                plan.preempted.append(self._preempt_newest())
        return [s for s in decoding if s.status is SequenceStatus.DECODING]

    def _preempt_newest(self) -> Sequence:
        """Free the blocks of the newest running sequence (with its choices not yet started) and put it
        back at the head of the queue, to be computed again when blocks free up."""
        victim = self.running[-1]
        victim = victim.leader if victim.leader is not None else victim
        for member in (victim, *victim.followers):
            self.running.remove(member)
            self.blocks.preempt(member)
            member.status = SequenceStatus.WAITING
        self.waiting.appendleft(victim)
        logger.info(
            "request %s preempted: no free KV block (%d running)",
            victim.request_id,
            len(self.running),
        )
        return victim

    def _prefill_chunks(self, num_decoding: int) -> list[PrefillChunkPlan]:
        policy = self.prefill_policy
        budget = policy.budget(num_decoding)
        chunks: list[PrefillChunkPlan] = []
        for sequence in self.running:
            if sequence.status is not SequenceStatus.PREFILLING or sequence.leader is not None:
                continue  # a follower's prompt is its leader's: it starts when the leader's is done
            target = sequence.prefill_ids()
            remaining = len(target) - sequence.num_computed
            if sequence.blend is not None and remaining > MAX_BLEND_STEPS * policy.step_tokens:
                # A blend runs whole, its first layers over every token: one this long would hold a
                # step, and the memory a step's activations may take, far past the budget; it is
                # prefilled in chunks as without reuse.
                self.blocks.drop_blend(sequence)
            if sequence.blend is not None:
                # A blend runs whole (it chooses what to recompute over the whole prompt); it costs
                # what it computes, which is mostly not the documents it reuses.
                cost = blend_cost(sequence.blend, remaining)
                if chunks and cost > budget:
                    break
                budget -= cost
                chunks.append(PrefillChunkPlan(sequence, target, sequence.num_computed, remaining))
                continue
            size = policy.chunk(remaining, budget, head=not chunks, decoding=num_decoding > 0)
            if size <= 0:
                break  # first come, first served: no later prompt overtakes this one
            budget -= size
            chunks.append(PrefillChunkPlan(sequence, target, sequence.num_computed, size))
        return chunks

    def can_run_ahead(self, decoding: list[Sequence]) -> bool:
        """Whether the next step can only decode ``decoding`` again (nothing waits, nothing prefills)
        and each has a block for the position after next: then it may be launched before this step's
        tokens are read back."""
        return (
            not self.waiting
            and all(s.status is SequenceStatus.DECODING for s in self.running)
            and all(self.blocks.grow(s, s.next_position + 1) for s in decoding)
        )

    # -- after the step -------------------------------------------------------------------------
    def update(self, plan: StepPlan) -> list[list[Sequence]]:
        """The plan has run and its decoded tokens are recorded: register the blocks it filled, move
        prefills on. Returns the choice groups whose prompt is now done (leader first, its other
        choices forked off it), each to draw its first token from the leader's last logits."""
        self.register_decoded(plan.decode)
        started = []
        for chunk in plan.prefill:
            sequence = chunk.sequence
            sequence.num_computed += chunk.num_tokens
            self.blocks.blended(sequence)
            self.blocks.register_full(sequence, sequence.num_computed)
            if chunk.completes:
                sequence.status = SequenceStatus.DECODING
                started.append([sequence, *self._start_followers(sequence)])
        return started

    def register_decoded(self, decoding: list[Sequence]) -> None:
        """Register the blocks a decode step filled: a sequence fills one when its next position starts a
        block (positions advance one a step, so no boundary is skipped)."""
        if not self.blocks.pool.prefix_caching:
            return
        block_size = self.blocks.block_size
        for sequence in decoding:
            if (
                sequence.next_position % block_size == 0
                and sequence.status is SequenceStatus.DECODING
            ):
                self.blocks.register_full(sequence, sequence.next_position)

    def _start_followers(self, leader: Sequence) -> list[Sequence]:
        """The leader's other choices, decoding from its prompt's blocks (the partial last one
        copied); from now on each is a sequence of its own (preempted and recomputed alone)."""
        followers, leader.followers = leader.followers, []
        for follower in followers:
            self.blocks.fork(leader, follower, self._copy_block)
            follower.num_computed = follower.num_prompt_tokens
            follower.status = SequenceStatus.DECODING
            follower.leader = None
        return followers

    def finish_step(self) -> None:
        """Finished sequences leave: their blocks are freed (those registered stay cached)."""
        for sequence in [s for s in self.running if s.status is SequenceStatus.FINISHED]:
            self._release(sequence)

    # -- leaving --------------------------------------------------------------------------------
    def _remove(self, sequence: Sequence) -> None:
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        elif sequence in self.running:
            self._release(sequence)

    def _release(self, sequence: Sequence) -> None:
        sequence.status = SequenceStatus.FINISHED
        self.blocks.free(sequence)
        self.running.remove(sequence)

    def fail_all(self, exc: BaseException) -> list[tuple[Sequence, BaseException]]:
        """Every running and waiting request, out of the queues, each paired with ``exc``."""
        failed = [(sequence, exc) for sequence in self.running]
        for sequence in self.running:
            sequence.status = SequenceStatus.FINISHED
            self.blocks.free(sequence)
        self.running.clear()
        failed += [(sequence, exc) for sequence in self.waiting]
        self.waiting = deque()
        return failed
