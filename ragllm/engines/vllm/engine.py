"""The ``vllm`` engine: a supervised `vllm serve` child, reached as a one-replica upstream.

The child listens on 127.0.0.1 only; its flags come from ``vllm_args``. Until it answers /health the
engine reports loading; while it is being restarted, requests get 503 with Retry-After rather than
waiting on a process that may never come back.
"""

from __future__ import annotations

import shlex

from ragllm.config import Settings
from ragllm.engines.upstream.engine import UpstreamEngine
from ragllm.engines.vllm.flags import vllm_serve_args
from ragllm.engines.vllm.supervisor import ChildState, ChildSupervisor, SupervisorTimings
from ragllm.generation import EngineHealth, EngineState


class VllmEngine(UpstreamEngine):
    name = "vllm"

    def __init__(self, settings: Settings) -> None:
        child_url = f"http://127.0.0.1:{settings.vllm.port}"
        # The child is the only replica: never eject it for long, it is either starting or serving.
        upstream = settings.upstream.model_copy(update={"urls": [child_url], "eject_for_s": 1.0})
        super().__init__(settings.engine, upstream)
        command = vllm_serve_args(settings, executable=shlex.split(settings.vllm.command))
        timings = SupervisorTimings(
            startup_timeout_s=settings.vllm.startup_timeout_s,
            restart_backoff_max_s=settings.vllm.restart_backoff_max_s,
            stop_grace_s=settings.vllm.stop_grace_s,
        )
        self.supervisor = ChildSupervisor(command, f"{child_url}/health", timings, name="vllm")

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmEngine:
        return cls(settings)

    async def start(self) -> None:
        await self.supervisor.start()
        await self.supervisor.wait_ready()
        await super().start()

    def health(self) -> EngineHealth:
        child = self.supervisor
        if child.state is ChildState.FAILED:
            return EngineHealth(
                EngineState.BROKEN,
                child.detail + " (is vLLM installed? pip install vllm, "
                "or set RAGLLM_VLLM__COMMAND)",
            )
        if child.state is not ChildState.READY:
            return EngineHealth(EngineState.LOADING, child.detail)
        return super().health()

    async def aclose(self) -> None:
        await super().aclose()
        await self.supervisor.stop()
