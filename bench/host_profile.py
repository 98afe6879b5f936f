"""Where the host's time goes while the in-process engine decodes: the engine thread (scheduling,
the runner's launches, sampling, masks, detokenizing) and the event loop (handing deltas to
streams). On a GPU the host's work per step is what can leave the device idle.

    with HostProfile(engine.worker) as profile:
        ...  # run a batch
    print(profile.table(20))

From Python 3.12 a profiler sees every thread (it is built on ``sys.monitoring``, one per process), so
one table covers both; before, each thread is profiled apart.
"""

from __future__ import annotations

import cProfile
import importlib
import io
import pstats
import sys
import time
from typing import Any

_SEES_EVERY_THREAD = sys.version_info >= (3, 12)
_ABSENT = object()


class _Wrapped:
    """Attributes replaced by wrappers of themselves for a while, then put back as they were: an
    instance's own attribute restored, a class's method showing through again."""

    def __init__(self) -> None:
        self._restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, wrapper: Any) -> None:
        """``owner.name`` becomes ``wrapper(owner.name)``."""
        own = vars(owner).get(name, _ABSENT)
        self._restore.append((owner, name, own))
        setattr(owner, name, wrapper(getattr(owner, name)))

    def restore(self) -> None:
        for owner, name, own in reversed(self._restore):
            if own is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._restore.clear()


class HostProfile:
    """Profiles the calling thread and, where a profiler does not already see it, every
    ``run_once`` of ``worker`` on the engine thread."""

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self._profiles = {
            "every thread" if _SEES_EVERY_THREAD else "event loop": cProfile.Profile()
        }
        self._wrapped = _Wrapped()

    def __enter__(self) -> HostProfile:
        if not _SEES_EVERY_THREAD:
            engine = self._profiles["engine thread"] = cProfile.Profile()

            def profiling(run_once: Any) -> Any:
                def profiled(block: bool = False):
                    engine.enable()
                    try:
                        return run_once(block)
                    finally:
                        engine.disable()

                return profiled

            # The engine thread looks ``run_once`` up on every pass.
            self._wrapped.wrap(self._worker, "run_once", profiling)
        self._profiles[next(iter(self._profiles))].enable()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._profiles[next(iter(self._profiles))].disable()
        self._wrapped.restore()

    def table(self, top: int) -> str:
        """The ``top`` functions by their own time, per profile."""
        parts = []
        for name, profile in self._profiles.items():
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
            parts.append(f"== {name} ==\n" + out.getvalue().split("\n", 3)[-1])
        return "\n".join(parts)


class PhaseTimes:
    """Wall time of the engine thread's phases per decode step, by timing a few of the worker's
    calls: cheap enough (a clock read each side) to leave the balance between host and device as it
    is, which a profiler does not. ``waiting for tokens`` is host time the device still needed: the
    host's slack in that step."""

    PHASES = {
        "pass": ("run_once",),
        "deliver": ("deliver",),
        "masks": ("sampler", "constrain"),
        "record": ("record",),
        "decode launch": ("runner", "decode"),
        "waiting for tokens": ("readback", "finish"),
        "mask fill": ("sampler", "masks", "fill"),
        "llguidance call": ("sampler", "masks", "fill_batch"),
        "mask kernel": ("ragllm.engines.inprocess.sample.masks", "masked_logits"),
        "sample launch": ("ragllm.engines.inprocess.sample.sampler", "sample_on_device"),
        "scores": ("ragllm.engines.inprocess.worker", "scores_on_device"),
        "readback start": ("readback", "start"),
        "schedule": ("scheduler", "schedule"),
        "prefill": ("runner", "prefill_many"),
        "update": ("scheduler", "update"),
        "release": ("scheduler", "finish_step"),
    }

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.cpu_seconds = dict.fromkeys(
            self.PHASES, 0.0
        )  # the engine thread's own CPU time in each
        self._wrapped = _Wrapped()
        self._steps_before = 0
        self._started = self._caller_cpu_started = 0.0

    def __enter__(self) -> PhaseTimes:
        for phase, path in self.PHASES.items():
            # A dotted first name is a module (a function it calls by its global name); else the
            # path runs from the worker.
            owner = importlib.import_module(path[0]) if "." in path[0] else self._worker
            for name in path[1 if "." in path[0] else 0 : -1]:
                owner = getattr(owner, name)
            if owner is None:  # made on first use (the masks): not timed before then
                continue
            self._wrapped.wrap(owner, path[-1], lambda call, phase=phase: self._timed(phase, call))
        self._steps_before = self._worker.num_steps
        self._started = time.perf_counter()
        self._caller_cpu_started = time.thread_time()  # entered and left on the event loop's thread
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall_s = time.perf_counter() - self._started
        self.caller_cpu_s = time.thread_time() - self._caller_cpu_started
        self.steps = self._worker.num_steps - self._steps_before
        self._wrapped.restore()

    def _timed(self, phase: str, call: Any) -> Any:
        seconds, cpu_seconds = self.seconds, self.cpu_seconds

        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - started
                cpu_seconds[phase] += time.thread_time() - cpu_started

        return timed

    def per_step_ms(self) -> dict[str, float]:
        """Each phase's mean ms per step as wall/CPU (the engine thread's own CPU time; the rest it
        spent blocked: on the device, on llguidance's threads or for the GIL), and the step's period."""
        steps = max(self.steps, 1)
        report = {
            phase: f"{total / steps * 1e3:.3f}/{self.cpu_seconds[phase] / steps * 1e3:.3f}"
            for phase, total in self.seconds.items()
        }
        return {
            "steps": self.steps,
            "step period": round(self.wall_s / steps * 1e3, 3),
            **report,
            "event loop CPU": round(self.caller_cpu_s / steps * 1e3, 3),
        }
