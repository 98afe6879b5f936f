"""How long one structured-output row's token mask may take in a step, and which rows are over it.

A step waits for its slowest mask, so a grammar whose masks are slow slows every request in its
batch. Two bounds hold a row:

- the absolute budget (``engine.grammar_mask_budget_ms``): no one mask may take longer, batch or not;
- a share of the step's other work (``engine.grammar_mask_step_share``): a row whose masks cost more
  than that share of what the rest of its steps took (the model, sampling, delivery), summed over
  its last ``WINDOW`` steps, ends alone. Its batch-mates' steps thus grow by about that share at most,
  on a GPU's few-millisecond steps as on a CPU's tens. A row alone in its batch slows nobody and is
  held to the absolute budget only. ``FLOOR_S`` keeps fast steps from ending ordinary schemas, whose
  masks take tens of microseconds.

The batch's rows are filled in one call, which times them only together. A call within one row's
allowance clears them all. Past it, the next step fills one row of the batch, in turn, in a call of
its own, timed on the engine thread's CPU clock (a wall clock would charge a row for the OS preempting
the thread). A row found over its allowance, or a batch call that overran what all its rows may take,
makes suspects: rows filled and timed alone every step. A suspect whose last ``WINDOW`` masks all kept
within its allowance is trusted again. A row thus hides in its batch for at most as many steps as the
batch has rows, and batches of ordinary grammars pay for no call of their own (each costs a hand-off of
the GIL).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW = (
    8  # steps a row's mask cost is summed over: one slow step of an ordinary grammar ends nothing
)
FLOOR_S = 0.001  # the least a row may spend a step, however fast the step
IDLE_S = 1.0  # a longer gap between two constrained steps was idle time, not the work of a step


def mask_threads() -> int:
    """llguidance's batch call spreads rows over 80% of the CPUs, at most 32."""
    return max(1, min(32, int(0.8 * (os.cpu_count() or 1))))


@dataclass
class _Suspect:
    last_step: int
    costs: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


class MaskWatch:
    """Bounds for the rows of one engine's batches: ``budget_s`` per mask (None: none) and
    ``step_share`` of the step's other work per row (None: none)."""

    def __init__(
        self,
        budget_s: float | None,
        step_share: float | None,
        threads: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget_s = budget_s
        self.step_share = step_share
        self.threads = threads or mask_threads()
        self._clock = clock
        self._others: deque[float] = deque(
            maxlen=WINDOW
        )  # the other work of the last steps, seconds
        self._last_fill_end: float | None = None
        self._suspects: dict[int, _Suspect] = {}
        self._step = 0
        self._sample_next = (
            False  # the last batch call took longer than one row may: time one alone
        )

    def step_started(self) -> None:
        """A constrained step's masks are about to be filled: what passed since the last fill ended
        was the rest of the last step."""
        self._step += 1
        # A suspect absent for a window of steps has left (finished, aborted): forget it.
        for key in [
            key
            for key, suspect in self._suspects.items()
            if self._step - suspect.last_step > WINDOW
        ]:
            del self._suspects[key]
        now = self._clock()
        if self._last_fill_end is not None and now - self._last_fill_end < IDLE_S:
            self._others.append(now - self._last_fill_end)

    def step_filled(self) -> None:
        self._last_fill_end = self._clock()

    def allowance_s(self, alone: bool) -> float | None:
        """What one row may spend on its mask in a step (None: no bound)."""
        share = None
        if self.step_share is not None and not alone and self._others:
            share = max(FLOOR_S, self.step_share * sum(self._others) / len(self._others))
        bounds = [bound for bound in (self.budget_s, share) if bound is not None]
        return min(bounds) if bounds else None

    def is_suspect(self, key: int) -> bool:
        return key in self._suspects

    def batch_filled(self, keys: list[int], elapsed_s: float, alone: bool) -> None:
        """The rows ``keys`` were filled together in ``elapsed_s``: over what they may take, each
        becomes a suspect."""
        allowance = self.allowance_s(alone)
        self._sample_next = bool(keys) and allowance is not None and elapsed_s > allowance
        if (
            keys
            and allowance is not None
            and elapsed_s > allowance * math.ceil(len(keys) / self.threads)
        ):
            for key in keys:
                self._suspects.setdefault(key, _Suspect(self._step))

    def sampled(self, keys: list[int], alone: bool) -> int | None:
        """The row of ``keys`` (none of them suspects) to fill and time alone this step, in turn."""
        if not self._sample_next or alone or not keys or self.allowance_s(alone) is None:
            return None
        return keys[self._step % len(keys)]

    def sample_filled(self, key: int, cost_s: float, alone: bool) -> str | None:
        """A sampled row's mask took ``cost_s`` of CPU: over its allowance it becomes a suspect (and
        over the budget it ends: the reason, else None)."""
        allowance = self.allowance_s(alone)
        if allowance is not None and cost_s > allowance:
            self._suspects[key] = _Suspect(self._step)
            return self.suspect_filled(key, cost_s, alone)
        return None

    def suspect_filled(self, key: int, cost_s: float, alone: bool) -> str | None:
        """A suspect's mask took ``cost_s`` of CPU: why it must end (None: it goes on)."""
        suspect = self._suspects[key]
        suspect.costs.append(cost_s)
        suspect.last_step = self._step
        if self.budget_s is not None and cost_s > self.budget_s:
            return (
                f"computing its token mask took {cost_s * 1000:.0f} ms, over the "
                f"{self.budget_s * 1000:g} ms a step may spend on one row"
            )
        allowance = self.allowance_s(alone)
        if (
            self.step_share is not None
            and allowance is not None
            and not alone
            and sum(suspect.costs) > allowance * WINDOW
        ):
            return (
                f"its token masks took {sum(suspect.costs) * 1000:.1f} ms over its last "
                f"{len(suspect.costs)} steps, more than the {self.step_share:.0%} of the batch's "
                f"other work ({allowance * WINDOW * 1000:.1f} ms over {WINDOW} steps) a row may "
                "slow the requests beside it by"
            )
        if len(suspect.costs) == WINDOW and (allowance is None or max(suspect.costs) <= allowance):
            del self._suspects[key]  # a window within its allowance: trusted again
        return None

    def ended(self, key: int) -> None:
        self._suspects.pop(key, None)
