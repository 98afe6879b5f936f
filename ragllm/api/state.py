"""What the routes share: built once per app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ragllm.access.keys import KeyRing
from ragllm.access.rate_limits import RateLimiter
from ragllm.api.outbox_budget import OutboxBudget
from ragllm.cache import ResponseCache
from ragllm.config import Settings
from ragllm.engines.base import Engine
from ragllm.lifecycle import Lifecycle
from ragllm.redis_link import RedisLink
from ragllm.serving.prepare import RequestPreparer
from ragllm.telemetry.metrics import Metrics
from ragllm.telemetry.request_log import RequestLog
from ragllm.telemetry.tracing import Tracing


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    metrics: Metrics
    preparer: RequestPreparer
    redis: RedisLink | None
    cache: ResponseCache
    keys: KeyRing
    limiter: RateLimiter
    request_log: RequestLog
    tracing: Tracing
    lifecycle: Lifecycle
    outbox_budget: OutboxBudget
    started_at: float = field(default_factory=time.monotonic)
    started_at_wall: float = field(default_factory=time.time)
