"""A model of one vLLM replica's timing, for capacity work (not a test double of vLLM's API).

Continuous batching in steps, as vLLM schedules them: each step decodes one token for every running
sequence and prefills the prompts admitted in it (within ``max_num_seqs`` and a per-step prefill
token budget); a step takes ``step_base_s + step_per_row_s * rows + prefill_s_per_token * uncached
tokens``, times the replica's ``slowdown``. A prompt's document tokens are free when its document
set is in the replica's prefix cache, an LRU of ``cache_doc_sets`` sets (the KV blocks a replica can
keep besides its running sequences). An admitted request's first token comes at the end of its
admission step, its last ``output_tokens - 1`` steps later.

The defaults are calibrated from this project's measurements of Qwen2.5-1.5B in bf16 on one H200
(BENCHMARKS.md): a 2,048-token prefill in 12.3 ms (6 µs a token); a decode step of 1.60 ms for one
row and 3.7 ms for 64 rows of 4k-token contexts (17,346 tokens/s).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReplicaProfile:
    prefill_s_per_token: float = 6.0e-6
    step_base_s: float = 1.6e-3
    step_per_row_s: float = 3.3e-5
    max_num_seqs: int = 64
    max_prefill_tokens: int = 8192
    cache_doc_sets: int = 48


# Named replicas for capacity planning. "measured": from this project's H200 runs (above); the L4 one
# is estimated from published figures and the datasheet, not measured here: NVIDIA L4 300 GB/s and
# 121 dense bf16 TFLOP/s; Qwen2.5-7B-Instruct-AWQ ~5.5 GB of weights read per step (a step of ~18 ms),
# 28.7 KB of fp8 KV per token read per row (~0.3 ms a row at 3k-token contexts), 2 x 7.6 GFLOP per
# prompt token at half the peak (0.25 ms a token); 16 GB of KV memory beside the weights holds ~150
# 3k-token document sets beyond 32 running sequences. A published vLLM run on an L4 (7B, FP16, 64
# concurrent: 831 tokens/s; AWQ 2.5x that) is in the same range as the steps this gives.
PROFILES = {
    "h200-qwen2.5-1.5b": ReplicaProfile(
        max_num_seqs=32, cache_doc_sets=1400
    ),  # 4.3M bf16 KV tokens / ~3k
    "l4-qwen2.5-7b-awq": ReplicaProfile(
        prefill_s_per_token=2.5e-4,
        step_base_s=1.8e-2,
        step_per_row_s=3.0e-4,
        max_num_seqs=32,
        max_prefill_tokens=8192,
        cache_doc_sets=150,
    ),
}


@dataclass(eq=False)
class SimRequest:
    index: int
    doc_set: int
    doc_tokens: int
    prompt_tokens: int
    output_tokens: int
    arrival: float
    replica: int = -1
    cache_hit: bool = False
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def ttft(self) -> float:
        return (self.first_token_at or self.arrival) - self.arrival


@dataclass(eq=False)
class ReplicaModel:
    profile: ReplicaProfile = field(default_factory=ReplicaProfile)
    slowdown: float = (
        1.0  # a slower GPU, or a replica turned slow: every step takes this much longer
    )
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)  # heap of (finishing step, request index, request)
    step: int = 0
    busy: bool = False
    admitted_this_step: list = field(default_factory=list)
    cache: OrderedDict = field(default_factory=OrderedDict)
    hits: int = 0
    lookups: int = 0

    def submit(self, request: SimRequest) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def start_step(self) -> float:
        """Admit what fits and return how long this step takes."""
        profile = self.profile
        budget = profile.max_prefill_tokens
        prefill_tokens = 0
        self.admitted_this_step = []
        while (
            self.waiting and len(self.running) + len(self.admitted_this_step) < profile.max_num_seqs
        ):
            request = self.waiting[0]
            uncached = request.prompt_tokens - (
                request.doc_tokens if request.doc_set in self.cache else 0
            )
            if self.admitted_this_step and prefill_tokens + uncached > budget:
                break
            self.waiting.popleft()
            request.cache_hit = self._look_up(request.doc_set)
            prefill_tokens += uncached
            self.admitted_this_step.append(request)
        rows = len(self.running) + len(self.admitted_this_step)
        self.busy = True
        return self.slowdown * (
            profile.step_base_s
            + profile.step_per_row_s * rows
            + profile.prefill_s_per_token * prefill_tokens
        )

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """End the step at ``now``: (requests whose first token came, requests that finished)."""
        first = self.admitted_this_step
        for request in first:
            request.first_token_at = now
            heapq.heappush(
                self.running, (self.step + request.output_tokens - 1, request.index, request)
            )
        finished = []
        while self.running and self.running[0][0] <= self.step:
            request = heapq.heappop(self.running)[2]
            request.finished_at = now
            finished.append(request)
        self.step += 1
        self.busy = False
        self.admitted_this_step = []
        return first, finished

    def _look_up(self, doc_set: int) -> bool:
        self.lookups += 1
        hit = doc_set in self.cache
        if hit:
            self.hits += 1
            self.cache.move_to_end(doc_set)
        else:
            self.cache[doc_set] = True
            if len(self.cache) > self.profile.cache_doc_sets:
                self.cache.popitem(last=False)
        return hit
