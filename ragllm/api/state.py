"""What the routes share: built once per app in its lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
import time

from ragllm.config import Settings
from ragllm.engines.base import Engine
from ragllm.service import CompletionService
from ragllm.telemetry.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    metrics: Metrics
    service: CompletionService
    started_at: float = field(default_factory=time.monotonic)
    started_at_wall: float = field(default_factory=time.time)
