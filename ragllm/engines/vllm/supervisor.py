"""Supervising a child server process: start, wait until ready, restart when it dies, stop cleanly.

Used by the ``vllm`` engine for its `vllm serve` child, but knows nothing of vLLM: a command line and
a health URL that answers 200 once the child can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)
READY_POLL_S = 0.5
STABLE_AFTER_S = 60.0  # a child that stayed up this long resets the restart back-off


class ChildState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"  # cannot be started at all (no such executable); not retried


@dataclass(frozen=True, slots=True)
class SupervisorTimings:
    startup_timeout_s: float = 1200.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    stop_grace_s: float = 15.0


class ChildSupervisor:
    def __init__(
        self,
        command: Sequence[str],
        health_url: str,
        timings: SupervisorTimings = SupervisorTimings(),
        name: str = "child",
    ) -> None:
        self.command = list(command)
        self.health_url = health_url
        self.timings = timings
        self.name = name
        self.state = ChildState.STOPPED
        self.detail = ""
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Begin supervising; returns at once (``wait_ready`` waits for the first ready child)."""
        self._task = asyncio.create_task(self._supervise())

    async def wait_ready(self) -> None:
        """Until a child answers its health URL; raises RuntimeError once the child cannot be started."""
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise RuntimeError(self.detail or f"{self.name} stopped before it was ready")

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL after the grace period; no restart follows."""
        self._stopping = True
        await self._terminate()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.state = ChildState.STOPPED

    # -- the loop ---------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        backoff = self.timings.restart_backoff_s
        while not self._stopping:
            started_at = time.monotonic()
            if not await self._spawn():
                return
            returncode = await self._run_once()
            if self._stopping:
                return
            self._ready.clear()
            if time.monotonic() - started_at > STABLE_AFTER_S:
                backoff = self.timings.restart_backoff_s
            self.restarts += 1
            self.state = ChildState.RESTARTING
            self.detail = (
                f"{self.name} exited with {returncode}; restart {self.restarts} in {backoff:.0f} s"
            )
            logger.error("%s", self.detail)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.timings.restart_backoff_max_s)

    async def _spawn(self) -> bool:
        self.state = ChildState.STARTING
        try:
            # Its own session, so a stop reaches the workers it forks (vLLM runs one per GPU).
            self.process = await asyncio.create_subprocess_exec(
                *self.command, start_new_session=True, preexec_fn=_die_with_parent
            )
        except OSError as exc:
            self.state = ChildState.FAILED
            self.detail = f"cannot start {self.name} ({' '.join(self.command[:2])}): {exc}"
            logger.error("%s", self.detail)
            return False
        self.detail = f"{self.name} is starting (pid {self.process.pid})"
        logger.info("%s: %s", self.detail, " ".join(self.command))
        return True

    async def _run_once(self) -> int:
        """Wait for readiness (or give up on it), then for the child's exit; returns its exit code."""
        exited = asyncio.create_task(self.process.wait())
        try:
            healthy = await asyncio.wait_for(
                self._until_healthy(exited), self.timings.startup_timeout_s
            )
        except TimeoutError:
            logger.error(
                "%s was not ready within %.0f s; killing it",
                self.name,
                self.timings.startup_timeout_s,
            )
            await self._terminate()
            healthy = False
        if healthy and not exited.done():
            self.state = ChildState.READY
            self.detail = ""
            self._ready.set()
            logger.info("%s is ready (pid %d)", self.name, self.process.pid)
        return await exited

    async def _until_healthy(self, exited: asyncio.Task) -> bool:
        """True once the health URL answers 200; False if the child exits first."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while not exited.done():
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(self.health_url) as response:
                        if response.status == 200:
                            return True
                await asyncio.wait({exited}, timeout=READY_POLL_S)
        return False

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.timings.stop_grace_s)
        except TimeoutError:
            logger.warning(
                "%s ignored SIGTERM for %.0f s; killing it", self.name, self.timings.stop_grace_s
            )
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM if the supervising process dies (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
