"""Engines behind the seam in ``base.py``, looked up by name without importing the heavy ones."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragllm.config import Settings
    from ragllm.engines.base import Engine

# name → "module:class"; the import happens only when the engine is chosen (torch is heavy).
# Each class has ``from_settings(settings)`` taking the whole settings tree.
ENGINES: dict[str, str] = {
    "transformers": "ragllm.engines.inprocess.engine:TransformersEngine",
    "upstream": "ragllm.engines.upstream.engine:UpstreamEngine",
    "vllm": "ragllm.engines.vllm.engine:VllmEngine",
}


def create_engine(settings: Settings) -> Engine:
    """Instantiate the engine named by ``settings.engine.name``; raises ValueError for an unknown name."""
    try:
        target = ENGINES[settings.engine.name]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise ValueError(
            f"unknown engine {settings.engine.name!r}; known engines: {known}"
        ) from None
    module_name, _, attr = target.partition(":")
    engine_class = getattr(importlib.import_module(module_name), attr)
    return engine_class.from_settings(settings)
