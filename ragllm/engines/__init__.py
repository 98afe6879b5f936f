"""Engines behind the seam in ``base.py``, looked up by name without importing the heavy ones."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragllm.config import EngineSettings
    from ragllm.engines.base import Engine

# name → "module:factory"; the import happens only when the engine is chosen (torch is heavy).
ENGINES: dict[str, str] = {
    "transformers": "ragllm.engines.transformers_impl:TransformersEngine",
    "upstream": "ragllm.engines.upstream:UpstreamEngine",
}


def create_engine(settings: "EngineSettings") -> "Engine":
    """Instantiate the engine named by ``settings.name``; raises ValueError for an unknown name."""
    try:
        target = ENGINES[settings.name]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown engine {settings.name!r}; known engines: {known}") from None
    module_name, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(settings)
