"""What a checkpoint declares about its quantization, and what the "auto" settings mean for it.
Shared by the in-process engine and the flags of a supervised vLLM, so both read a model alike."""

from __future__ import annotations

import json
import re
from pathlib import Path

AUTO = "auto"
NAMED_METHODS = ("awq", "gptq")


def checkpoint_quantization(model: str) -> str | None:
    """The quantization a checkpoint declares: its local config.json's ``quant_method``, else an
    ``-AWQ`` / ``-GPTQ`` name as Hugging Face ids spell them; None for a full-precision checkpoint."""
    config = Path(model) / "config.json"
    if config.is_file():
        try:
            declared = json.loads(config.read_text()).get("quantization_config") or {}
        except (OSError, ValueError):
            declared = {}
        return declared.get("quant_method")
    name = model.rsplit("/", 1)[-1].lower()
    return next(
        (method for method in NAMED_METHODS if re.search(rf"(^|[-_.]){method}($|[-_.])", name)),
        None,
    )


def resolved_kv_cache_dtype(setting: str | None, model: str) -> str | None:
    """A KV cache dtype setting (``engine.kv_cache_dtype``, ``vllm.kv_cache_dtype``) as both engines
    apply it: "auto" is fp8 for a quantized checkpoint (the
    deployment README's pairing) and the model's own dtype otherwise (None); other values as given."""
    if setting == AUTO:
        return "fp8" if checkpoint_quantization(model) else None
    return setting
