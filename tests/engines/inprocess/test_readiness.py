"""Readiness is work done, not a thread alive: an idle engine proves itself with canary generations,
and one that stops answering is reported broken. The packaged model, in process."""

from __future__ import annotations

import asyncio
import time

from ragllm.config import load_settings
from ragllm.engines.inprocess.engine import TransformersEngine
from ragllm.generation import EngineState


async def test_an_idle_engine_runs_canaries_and_a_hung_one_is_reported(monkeypatch):
    settings = load_settings().engine.model_copy(
        update={"canary_interval_s": 0.2, "stall_timeout_s": 1.0}
    )
    engine = TransformersEngine(settings)
    await engine.start()
    try:
        worker = engine.worker
        steps = worker.num_steps
        await asyncio.sleep(1.0)
        assert worker.num_steps > steps  # canaries ran with no request in sight
        assert engine.health().state is EngineState.READY
        monkeypatch.setattr(
            worker, "step", lambda plan, results: time.sleep(5)
        )  # the model stops answering
        await asyncio.sleep(2.5)
        health = engine.health()
        assert health.state is EngineState.BROKEN and health.restart_needed
        assert "canary" in health.detail
    finally:
        await engine.aclose()
