"""Token masks for the rows of a batch that follow a grammar, applied where the logits live.

The masks are computed on the host (llguidance, the whole batch in one call without the GIL) into
a pinned buffer, copied to the device without blocking and applied there (``mask_kernel``), so on a
GPU a constrained row costs the host a fraction of a millisecond while the device is busy and never
waits for a sync.
Rows without a grammar are not touched.

A step waits for its slowest mask, so one grammar whose masks are slow would slow every request in
its batch: ``MaskWatch`` says what a row may spend and which rows to time alone; a row over its
allowance ends with an error of its own (``MaskOverBudget``) while the others go on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from ragllm.engines.inprocess.sample.mask_kernel import BITS, masked_logits
from ragllm.engines.inprocess.sample.mask_watch import MaskWatch
from ragllm.structured.grammars import Grammar, GrammarViolation, MaskOverBudget

logger = logging.getLogger(__name__)


class TokenMasks:
    """Masks for a model whose logits have ``vocab_size`` columns, on ``device``; ``budget_s`` is what
    one row's mask may take in a step and ``step_share`` the share of a step's other work a row's
    masks may add to its batch (None: no bound; see ``mask_watch``)."""

    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        whole_batch: bool | None = None,
        budget_s: float | None = None,
        step_share: float | None = None,
    ) -> None:
        self.device = device
        self.watch = MaskWatch(budget_s, step_share)
        self.num_over_budget = 0  # rows ended for a slow mask, for tests and logs
        self.fill_seconds: deque[float] = deque(maxlen=4096)  # each step's fill, for benchmarks
        self.words = (vocab_size + BITS - 1) // BITS
        self._pinned = device.type == "cuda"
        self._whole_batch = self._pinned if whole_batch is None else whole_batch
        # Two host buffers in turn: a copy still in flight reads one while the next step fills the other.
        self._buffers: list[torch.Tensor] = []
        self._turn = 0
        self._executor = None  # llguidance's, made on first use

    def apply(
        self, logits: torch.Tensor, grammars: Sequence[Grammar | None]
    ) -> tuple[torch.Tensor, list[Exception | None]]:
        """``logits`` [rows, vocab] with every constrained row's disallowed tokens at -inf (a copy;
        the caller's logits stay as the model gave them, for log probabilities), and for each row the
        error that ends it alone (its grammar failed or allows nothing), else None."""
        rows = [row for row, grammar in enumerate(grammars) if grammar is not None]
        failures: list[Exception | None] = [None] * len(grammars)
        if not rows:
            return logits, failures
        if self._whole_batch:
            # On a GPU every row gets a mask (all ones where there is no grammar): indexing the rows
            # would copy an index from pageable memory, which waits for the step in flight.
            bitmask = self._buffer(len(grammars))
            if len(rows) < len(grammars):  # llguidance writes every constrained row whole
                free = [row for row, grammar in enumerate(grammars) if grammar is None]
                bitmask.numpy()[
                    free
                ] = -1  # numpy: one thread; torch would wake its CPU pool beside the fill
            self.fill(bitmask, grammars, failures, alone=len(grammars) == 1)
            return masked_logits(logits, bitmask.to(self.device, non_blocking=True)), failures
        bitmask = self._buffer(len(rows))
        self.fill(
            bitmask, [grammars[row] for row in rows], failures, rows, alone=len(grammars) == 1
        )
        index = torch.tensor(rows)
        masked = logits.clone()
        masked[index] = masked_logits(masked[index], bitmask)
        return masked, failures

    def fill(
        self,
        bitmask: torch.Tensor,
        grammars: Sequence[Grammar | None],
        failures: list,
        rows: list[int] | None = None,
        alone: bool = False,
    ) -> None:
        """Each grammar's mask into its row of ``bitmask``; ``rows`` maps them to the batch's rows
        (None: one to one, rows without a grammar left as they are); ``alone``: the batch has no
        other row to slow."""
        rows = rows if rows is not None else list(range(len(grammars)))
        present = [(i, grammar) for i, grammar in enumerate(grammars) if grammar is not None]
        suspects = [
            (i, grammar) for i, grammar in present if self.watch.is_suspect(id(grammar.matcher))
        ]
        together = [
            (i, grammar) for i, grammar in present if not self.watch.is_suspect(id(grammar.matcher))
        ]
        self.watch.step_started()
        started = time.perf_counter()
        sampled = self.watch.sampled([id(grammar.matcher) for _, grammar in together], alone)
        sample = [(i, grammar) for i, grammar in together if id(grammar.matcher) == sampled]
        together = [(i, grammar) for i, grammar in together if id(grammar.matcher) != sampled]
        if together:
            self.fill_batch(bitmask, together, failures, rows)
        self.watch.batch_filled(
            [id(grammar.matcher) for _, grammar in together], time.perf_counter() - started, alone
        )
        self._fill_alone(bitmask, sample, failures, rows, self.watch.sample_filled, alone)
        self._fill_alone(bitmask, suspects, failures, rows, self.watch.suspect_filled, alone)
        self.fill_seconds.append(time.perf_counter() - started)
        self.watch.step_filled()
        # A grammar in an error state may still allow the end of sequence: ask each, not only empty rows.
        empty = ~bitmask.numpy().any(axis=1)
        for i, grammar in present:
            error = grammar.error()
            if failures[rows[i]] is None and (error or empty[i]):
                failures[rows[i]] = GrammarViolation(
                    f"structured output: {error or 'no token can continue'}"
                )
                bitmask[i] = -1  # its tokens are not used; an all-masked row would only make NaNs

    def fill_batch(
        self,
        bitmask: torch.Tensor,
        present: list[tuple[int, Grammar]],
        failures: list,
        rows: list[int],
    ) -> None:
        """Every present grammar's mask, in one call that drops the GIL once and spreads the rows
        over llguidance's threads (80% of the CPUs, at most 32).

        Measured on an H200's host (``bench/mask_fill.py``): 32 rows beside a thread that holds the
        GIL, as the event loop does while it hands over the last step's deltas, took 29.6 ms a step
        with a call per row (each call drops the GIL and waits a switch interval to get it back)
        and 1.5 ms in one call on 16 threads; alone, 2.0 and 0.86 ms."""
        # llguidance.torch's wrappers are not used: importing that module compiles a kernel with
        # torch.compile, 1-2.5 s on the engine thread at the first constrained step (every request
        # waited); these are the calls they wrap. ``bitmask`` is a contiguous int32 host tensor.
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        row_bytes = bitmask.shape[1] * bitmask.element_size()
        try:
            self._executor.unsafe_compute_mask_ptr(
                [(grammar.matcher, i) for i, grammar in present],
                bitmask.data_ptr(),
                row_bytes,
                bitmask.shape[0],
            )
            return
        except Exception:  # a misused matcher: row by row, so that only its own row fails
            logger.warning(
                "filling token masks as one batch failed; filling row by row", exc_info=True
            )
        for i, grammar in present:
            try:
                grammar.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
            except Exception as exc:
                failures[rows[i]] = exc
                bitmask[i] = -1

    def _fill_alone(
        self,
        bitmask: torch.Tensor,
        alone_rows: list[tuple[int, Grammar]],
        failures: list,
        rows: list[int],
        judge: Callable[[int, float, bool], str | None],
        alone: bool,
    ) -> None:
        """Each row's mask in a call of its own, timed on this thread's CPU clock and judged by the
        watch: a row over its allowance ends alone. One call per row costs a GIL hand-off each (see
        ``fill_batch``), paid by suspects and one sampled row a step."""
        row_bytes = bitmask.shape[1] * bitmask.element_size()
        for i, grammar in alone_rows:
            started = time.thread_time()
            try:
                grammar.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
            except Exception as exc:
                failures[rows[i]] = exc
                bitmask[i] = -1
                self.watch.ended(id(grammar.matcher))
                continue
            reason = judge(id(grammar.matcher), time.thread_time() - started, alone)
            if reason is not None:
                self.num_over_budget += 1
                failures[rows[i]] = MaskOverBudget(f"structured output: {reason}")
                bitmask[i] = -1
                self.watch.ended(id(grammar.matcher))

    def _buffer(self, num_rows: int) -> torch.Tensor:
        if not self._buffers or self._buffers[0].shape[0] < num_rows:
            size = max(num_rows, 2 * self._buffers[0].shape[0] if self._buffers else 8)
            self._buffers = [
                torch.empty((size, self.words), dtype=torch.int32, pin_memory=self._pinned)
                for _ in range(2)
            ]
        self._turn ^= 1
        return self._buffers[self._turn][:num_rows]
