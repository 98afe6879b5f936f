"""Where the host's time goes while the in-process engine decodes: the engine thread (scheduling,
the runner's launches, sampling, masks, detokenizing) and the event loop (handing deltas to
streams). On a GPU the host's work per step is what can leave the device idle.

    with HostProfile(engine._scheduler) as profile:
        ...  # run a batch
    print(profile.table(20))

From Python 3.12 a profiler sees every thread (it is built on ``sys.monitoring``, one per process), so
one table covers both; before, each thread is profiled apart.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from typing import Any

_SEES_EVERY_THREAD = sys.version_info >= (3, 12)


class HostProfile:
    """Profiles the calling thread and, where a profiler does not already see it, every
    ``run_once`` of ``scheduler`` on the engine thread."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        self._profiles = {"every thread" if _SEES_EVERY_THREAD else "event loop": cProfile.Profile()}
        self._original = None

    def __enter__(self) -> "HostProfile":
        if not _SEES_EVERY_THREAD:
            engine = self._profiles["engine thread"] = cProfile.Profile()
            original = self._original = self._scheduler.run_once

            def profiled(block: bool = False):
                engine.enable()
                try:
                    return original(block)
                finally:
                    engine.disable()

            self._scheduler.run_once = profiled  # the engine thread looks it up on every pass
        self._profiles[next(iter(self._profiles))].enable()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._profiles[next(iter(self._profiles))].disable()
        if self._original is not None:
            self._scheduler.run_once = self._original

    def table(self, top: int) -> str:
        """The ``top`` functions by their own time, per profile."""
        parts = []
        for name, profile in self._profiles.items():
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
            parts.append(f"== {name} ==\n" + out.getvalue().split("\n", 3)[-1])
        return "\n".join(parts)
