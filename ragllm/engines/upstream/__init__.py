"""The ``upstream`` engine: a pool of OpenAI-compatible servers behind the engine seam.

``engine`` (the engine: probes, failover, request payloads), ``router`` (choosing a replica),
``stream`` (relaying one answer).
"""

from ragllm.engines.upstream.engine import UpstreamEngine, UpstreamError

__all__ = ["UpstreamEngine", "UpstreamError"]
